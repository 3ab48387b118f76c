//! How the in-memory broker's exchanges choose queues, as RabbitMQ's do:
//! direct (the key), fanout (every binding), topic (`*` is one word, `#`
//! zero or more), headers (`x-match` all or any, `x-` keys aside) and the
//! consistent-hash exchange of the plugin rabbitry's partitions use (a
//! stable hash of the routing key, or of the `hash-header`, over the
//! bindings weighted by their keys).

use crate::message::{HeaderValue, Headers};
use crate::topology::ExchangeKind;

/// One binding of an exchange: to a queue or (exchange-to-exchange) to
/// another exchange.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Binding {
    pub(crate) destination: Destination,
    pub(crate) key: String,
    pub(crate) arguments: Headers,
}

/// Where a binding leads.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Destination {
    Queue(String),
    Exchange(String),
}

/// The bindings of an exchange of `kind` (with `arguments`) that a message
/// with `routing_key` and `headers` matches.
pub(crate) fn matching<'a>(
    kind: ExchangeKind,
    arguments: &Headers,
    bindings: &'a [Binding],
    routing_key: &str,
    headers: &Headers,
) -> Vec<&'a Binding> {
    match kind {
        ExchangeKind::Direct => bindings.iter().filter(|b| b.key == routing_key).collect(),
        ExchangeKind::Fanout => bindings.iter().collect(),
        ExchangeKind::Topic => bindings
            .iter()
            .filter(|b| topic_matches(&b.key, routing_key))
            .collect(),
        ExchangeKind::Headers => bindings
            .iter()
            .filter(|b| headers_match(&b.arguments, headers))
            .collect(),
        ExchangeKind::ConsistentHash => {
            let input = match arguments.get("hash-header") {
                Some(HeaderValue::String(name)) => match headers.get(name) {
                    Some(v) => header_text(v),
                    // The plugin routes a message without the header
                    // nowhere.
                    None => return Vec::new(),
                },
                _ => routing_key.to_owned(),
            };
            consistent_hash(bindings, &input).into_iter().collect()
        }
    }
}

/// A topic binding key against a routing key: words split on `.`; `*`
/// matches exactly one word, `#` zero or more.
pub(crate) fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&"*", rest)) => !k.is_empty() && go(rest, &k[1..]),
            Some((word, rest)) => k.first() == Some(word) && go(rest, &k[1..]),
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = if key.is_empty() {
        Vec::new()
    } else {
        key.split('.').collect()
    };
    // An empty pattern matches only the empty key.
    if pattern.is_empty() {
        return key.is_empty();
    }
    go(&p, &k)
}

/// A headers binding: `x-match = all` (the default) needs every other
/// binding argument present with an equal value (a void value needs only
/// the key); `any` needs one. Arguments starting with `x-` are not
/// matched.
pub(crate) fn headers_match(binding: &Headers, headers: &Headers) -> bool {
    let any = matches!(binding.get("x-match"), Some(HeaderValue::String(m)) if m == "any" || m == "any-with-x");
    let mut wanted = binding
        .iter()
        .filter(|(k, _)| !k.starts_with("x-"))
        .peekable();
    if wanted.peek().is_none() {
        // No criteria: `all` of nothing holds; `any` of nothing does not.
        return !any;
    }
    let mut hits = wanted.map(|(k, v)| match headers.get(k) {
        Some(found) => matches!(v, HeaderValue::Void) || found == v,
        None => false,
    });
    if any {
        hits.any(|h| h)
    } else {
        hits.all(|h| h)
    }
}

fn header_text(v: &HeaderValue) -> String {
    match v {
        HeaderValue::String(s) => s.clone(),
        other => format!("{other:?}"),
    }
}

/// The one binding a consistent-hash exchange routes `input` to: each
/// binding owns as many points on a ring as its key's weight; the input's
/// hash picks the next point. Stable for a given set of bindings, and
/// spread in proportion to the weights.
fn consistent_hash<'a>(bindings: &'a [Binding], input: &str) -> Option<&'a Binding> {
    let mut ring: Vec<(u64, usize)> = Vec::new();
    for (i, b) in bindings.iter().enumerate() {
        let weight: u64 = b.key.trim().parse().unwrap_or(0);
        for point in 0..weight {
            ring.push((fnv(&format!("{:?}#{point}", b.destination)), i));
        }
    }
    if ring.is_empty() {
        return None;
    }
    ring.sort_unstable();
    let h = fnv(input);
    let at = ring.partition_point(|(p, _)| *p < h) % ring.len();
    Some(&bindings[ring[at].1])
}

/// FNV-1a, 64 bits, then mixed: stable across runs and platforms.
fn fnv(s: &str) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in s.bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^ (h >> 33)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_patterns_match_as_rabbitmq_documents() {
        for (pattern, key, expected) in [
            ("order.*", "order.created", true),
            ("order.*", "order.created.eu", false),
            ("order.#", "order", true),
            ("order.#", "order.created.eu", true),
            ("#", "", true),
            ("#", "a.b.c", true),
            ("*", "", false),
            ("*.eu", "order.eu", true),
            ("#.eu", "eu", true),
            ("#.eu.#", "a.eu.b", true),
            ("a.*.c", "a..c", true),
            ("a", "a", true),
            ("a", "b", false),
            ("", "", true),
            ("", "a", false),
        ] {
            assert_eq!(topic_matches(pattern, key), expected, "{pattern} ~ {key}");
        }
    }

    #[test]
    fn headers_match_all_and_any() {
        let h = |pairs: &[(&str, &str)]| -> Headers {
            pairs
                .iter()
                .map(|(k, v)| ((*k).to_owned(), HeaderValue::String((*v).to_owned())))
                .collect()
        };
        let msg = h(&[("format", "pdf"), ("type", "report")]);
        assert!(headers_match(&h(&[("format", "pdf")]), &msg));
        assert!(!headers_match(
            &h(&[("format", "pdf"), ("type", "log")]),
            &msg
        ));
        assert!(headers_match(
            &h(&[("x-match", "any"), ("format", "zip"), ("type", "report")]),
            &msg
        ));
        assert!(!headers_match(
            &h(&[("x-match", "any"), ("format", "zip")]),
            &msg
        ));
    }

    #[test]
    fn consistent_hash_is_stable_and_spreads_by_weight() {
        let bindings: Vec<Binding> = (0..4)
            .map(|i| Binding {
                destination: Destination::Queue(format!("q.p{i}")),
                key: "1".into(),
                arguments: Headers::new(),
            })
            .collect();
        let mut counts = [0usize; 4];
        for n in 0..4000 {
            let key = format!("order-{n}");
            let a = consistent_hash(&bindings, &key).unwrap();
            let b = consistent_hash(&bindings, &key).unwrap();
            assert_eq!(a, b, "the same key goes to the same queue");
            let Destination::Queue(q) = &a.destination else {
                unreachable!()
            };
            counts[q[3..].parse::<usize>().unwrap()] += 1;
        }
        assert!(
            counts.iter().all(|c| *c > 0),
            "every partition gets some: {counts:?}"
        );
    }
}
