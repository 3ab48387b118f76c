//! The cases, by area. Each takes a broker and runs the same way on both.

use rabbitry::memory::{Published, Settle};
use rabbitry::{ExchangeKind, HeaderValue, Headers, Properties};

use super::{get_eventually, headers, next, text, unique, Broker, Chan};

/// A durable queue of its own, with `arguments`.
async fn queue(ch: &dyn Chan, what: &str, arguments: &[(&str, HeaderValue)]) -> String {
    ch.declare_queue(&unique(what), true, false, &headers(arguments), false)
        .await
        .expect("declare a queue")
}

async fn publish(ch: &dyn Chan, exchange: &str, key: &str, body: &str) -> Published {
    ch.publish(exchange, key, false, Properties::default(), body)
        .await
        .expect("publish")
}

/// Dead-letters to `target` through the default exchange.
fn dead_letter_to(target: &str) -> [(&'static str, HeaderValue); 2] {
    [
        ("x-dead-letter-exchange", text("")),
        ("x-dead-letter-routing-key", text(target)),
    ]
}

pub(crate) mod routing {
    use super::*;

    pub(crate) async fn direct_topic_and_fanout_choose_their_queues(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let (direct, topic, fanout) = (unique("direct"), unique("topic"), unique("fanout"));
        ch.declare_exchange(&direct, ExchangeKind::Direct, &Headers::new())
            .await
            .unwrap();
        ch.declare_exchange(&topic, ExchangeKind::Topic, &Headers::new())
            .await
            .unwrap();
        ch.declare_exchange(&fanout, ExchangeKind::Fanout, &Headers::new())
            .await
            .unwrap();
        let (a, b) = (queue(&*ch, "a", &[]).await, queue(&*ch, "b", &[]).await);
        ch.bind(&a, &direct, "red", &Headers::new()).await.unwrap();
        ch.bind(&a, &topic, "order.*", &Headers::new())
            .await
            .unwrap();
        ch.bind(&b, &topic, "order.#", &Headers::new())
            .await
            .unwrap();
        ch.bind(&a, &fanout, "ignored", &Headers::new())
            .await
            .unwrap();
        ch.bind(&b, &fanout, "", &Headers::new()).await.unwrap();
        publish(&*ch, &direct, "red", "direct red").await;
        publish(&*ch, &direct, "blue", "direct blue").await;
        publish(&*ch, &topic, "order.created.eu", "topic deep").await;
        publish(&*ch, &topic, "order.created", "topic one").await;
        publish(&*ch, &fanout, "anything", "fanout").await;
        publish(&*ch, "", &b, "default").await;
        let mut on_a = Vec::new();
        while let Some(got) = ch.get(&a).await.unwrap() {
            on_a.push(got.body);
        }
        let mut on_b = Vec::new();
        while let Some(got) = ch.get(&b).await.unwrap() {
            on_b.push(got.body);
        }
        assert_eq!(on_a, ["direct red", "topic one", "fanout"]);
        assert_eq!(on_b, ["topic deep", "topic one", "fanout", "default"]);
        for q in [a, b] {
            ch.delete_queue(&q).await;
        }
        for x in [direct, topic, fanout] {
            ch.delete_exchange(&x).await;
        }
    }

    pub(crate) async fn headers_match_all_or_any(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let x = unique("headers");
        ch.declare_exchange(&x, ExchangeKind::Headers, &Headers::new())
            .await
            .unwrap();
        let (all, any) = (queue(&*ch, "all", &[]).await, queue(&*ch, "any", &[]).await);
        let criteria = [("format", text("pdf")), ("type", text("report"))];
        ch.bind(&all, &x, "", &headers(&criteria)).await.unwrap();
        let mut with_any = headers(&criteria);
        with_any.insert("x-match".into(), text("any"));
        ch.bind(&any, &x, "", &with_any).await.unwrap();
        for (body, format, kind) in [
            ("both", "pdf", "report"),
            ("one", "pdf", "log"),
            ("none", "zip", "log"),
        ] {
            let p = Properties {
                headers: headers(&[("format", text(format)), ("type", text(kind))]),
                ..Properties::default()
            };
            ch.publish(&x, "", false, p, body).await.unwrap();
        }
        let drain = |q: String| {
            let ch = &ch;
            async move {
                let mut out = Vec::new();
                while let Some(got) = ch.get(&q).await.unwrap() {
                    out.push(got.body);
                }
                out
            }
        };
        assert_eq!(drain(all.clone()).await, ["both"]);
        assert_eq!(drain(any.clone()).await, ["both", "one"]);
        ch.delete_queue(&all).await;
        ch.delete_queue(&any).await;
        ch.delete_exchange(&x).await;
    }

    pub(crate) async fn exchange_to_exchange_bindings_forward(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let (front, back) = (unique("front"), unique("back"));
        ch.declare_exchange(&front, ExchangeKind::Topic, &Headers::new())
            .await
            .unwrap();
        ch.declare_exchange(&back, ExchangeKind::Direct, &Headers::new())
            .await
            .unwrap();
        ch.bind_exchange(&back, &front, "audit.*").await.unwrap();
        let q = queue(&*ch, "audited", &[]).await;
        ch.bind(&q, &back, "audit.login", &Headers::new())
            .await
            .unwrap();
        publish(&*ch, &front, "audit.login", "forwarded").await;
        publish(&*ch, &front, "audit.logout", "not bound at the back").await;
        assert_eq!(get_eventually(&*ch, &q).await.body, "forwarded");
        assert!(ch.get(&q).await.unwrap().is_none());
        ch.delete_queue(&q).await;
        ch.delete_exchange(&front).await;
        ch.delete_exchange(&back).await;
    }

    pub(crate) async fn consistent_hash_keeps_each_key_on_one_queue(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let x = unique("hash");
        ch.declare_exchange(&x, ExchangeKind::ConsistentHash, &Headers::new())
            .await
            .unwrap();
        let mut queues = Vec::new();
        for i in 0..3 {
            let q = queue(&*ch, &format!("p{i}"), &[]).await;
            ch.bind(&q, &x, "1", &Headers::new()).await.unwrap();
            queues.push(q);
        }
        for n in 0..60 {
            publish(
                &*ch,
                &x,
                &format!("key-{}", n % 6),
                &format!("key-{}", n % 6),
            )
            .await;
        }
        let mut total = 0;
        let mut seen_on: std::collections::HashMap<String, usize> = Default::default();
        for (i, q) in queues.iter().enumerate() {
            while let Some(got) = ch.get(q).await.unwrap() {
                total += 1;
                let first = *seen_on.entry(got.body.clone()).or_insert(i);
                assert_eq!(first, i, "{} went to two queues", got.body);
            }
        }
        assert_eq!(total, 60);
        for q in queues {
            ch.delete_queue(&q).await;
        }
        ch.delete_exchange(&x).await;
    }
}

pub(crate) mod confirms {
    use super::*;

    pub(crate) async fn a_mandatory_unroutable_message_is_returned(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let x = unique("nowhere");
        ch.declare_exchange(&x, ExchangeKind::Direct, &Headers::new())
            .await
            .unwrap();
        let returned = ch
            .publish(&x, "k", true, Properties::default(), "m")
            .await
            .unwrap();
        assert_eq!(returned, Published::Returned);
        let dropped = ch
            .publish(&x, "k", false, Properties::default(), "m")
            .await
            .unwrap();
        assert_eq!(dropped, Published::Ack);
        ch.delete_exchange(&x).await;
    }

    pub(crate) async fn a_full_reject_publish_queue_nacks(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let q = queue(
            &*ch,
            "full",
            &[
                ("x-max-length", HeaderValue::Int(1)),
                ("x-overflow", text("reject-publish")),
            ],
        )
        .await;
        assert_eq!(publish(&*ch, "", &q, "1").await, Published::Ack);
        assert_eq!(publish(&*ch, "", &q, "2").await, Published::Nack);
        assert_eq!(get_eventually(&*ch, &q).await.body, "1");
        ch.delete_queue(&q).await;
    }
}

pub(crate) mod acks {
    use super::*;

    pub(crate) async fn prefetch_holds_back_until_an_ack(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let q = queue(&*ch, "prefetch", &[]).await;
        for body in ["1", "2"] {
            publish(&*ch, "", &q, body).await;
        }
        let mut rx = ch.consume(&q, 1, false).await.unwrap();
        let first = next(&mut rx).await;
        assert_eq!(first.body, "1");
        // A round trip on the channel: anything the broker would send is sent.
        ch.publish("", &unique("void"), false, Properties::default(), "x")
            .await
            .unwrap();
        assert!(rx.try_recv().is_err(), "prefetch 1 holds the second back");
        ch.settle(first.tag, Settle::Ack).await.unwrap();
        assert_eq!(next(&mut rx).await.body, "2");
        ch.delete_queue(&q).await;
    }

    pub(crate) async fn a_nack_with_requeue_redelivers_it_first(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let q = queue(&*ch, "requeue", &[]).await;
        for body in ["1", "2"] {
            publish(&*ch, "", &q, body).await;
        }
        let mut rx = ch.consume(&q, 1, false).await.unwrap();
        let first = next(&mut rx).await;
        assert!(!first.redelivered);
        ch.settle(first.tag, Settle::Requeue).await.unwrap();
        let again = next(&mut rx).await;
        assert_eq!((again.body.as_str(), again.redelivered), ("1", true));
        ch.settle(again.tag, Settle::Ack).await.unwrap();
        let second = next(&mut rx).await;
        assert_eq!((second.body.as_str(), second.redelivered), ("2", false));
        ch.settle(second.tag, Settle::Ack).await.unwrap();
        ch.delete_queue(&q).await;
    }

    pub(crate) async fn a_closed_channel_gives_its_unacked_back(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let q = queue(&*ch, "unacked", &[]).await;
        publish(&*ch, "", &q, "held").await;
        {
            let consumer = conn.channel().await;
            let mut rx = consumer.consume(&q, 10, false).await.unwrap();
            assert_eq!(next(&mut rx).await.body, "held");
            // An unknown tag closes that channel, with the delivery on it.
            assert!(consumer.settle(999_999, Settle::Ack).await.is_err());
        }
        let got = get_eventually(&*ch, &q).await;
        assert_eq!((got.body.as_str(), got.redelivered), ("held", true));
        ch.delete_queue(&q).await;
    }
}

pub(crate) mod ttl {
    use super::*;

    pub(crate) async fn a_queue_ttl_dead_letters_with_x_death_expired(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let target = queue(&*ch, "target", &[]).await;
        let mut args = dead_letter_to(&target).to_vec();
        args.push(("x-message-ttl", HeaderValue::Int(100)));
        let delay = queue(&*ch, "delay", &args).await;
        publish(&*ch, "", &delay, "later").await;
        let got = get_eventually(&*ch, &target).await;
        assert_eq!(got.body, "later");
        assert_eq!(got.death(), (delay.clone(), "expired".into(), 1));
        assert_eq!(got.header("x-first-death-reason"), Some(&text("expired")));
        assert_eq!(got.header("x-first-death-queue"), Some(&text(&delay)));
        ch.delete_queue(&delay).await;
        ch.delete_queue(&target).await;
    }

    pub(crate) async fn a_message_expiration_is_kept_as_original_expiration(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let target = queue(&*ch, "target", &[]).await;
        let delay = queue(&*ch, "delay", &dead_letter_to(&target)).await;
        let p = Properties {
            expiration: Some("50".into()),
            ..Properties::default()
        };
        ch.publish("", &delay, false, p, "brief").await.unwrap();
        let got = get_eventually(&*ch, &target).await;
        assert_eq!(
            got.properties.expiration, None,
            "the expiration is not carried on"
        );
        let Some(HeaderValue::Array(deaths)) = got.header("x-death") else {
            panic!("no x-death")
        };
        let Some(HeaderValue::Table(first)) = deaths.first() else {
            panic!("empty x-death")
        };
        assert_eq!(first.get("original-expiration"), Some(&text("50")));
        ch.delete_queue(&delay).await;
        ch.delete_queue(&target).await;
    }

    pub(crate) async fn a_reject_dead_letters_and_counts_each_death(broker: &dyn Broker) {
        // A message rejected twice from the same queue: one x-death entry
        // for (queue, rejected) whose count is 2.
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let dead = queue(&*ch, "dead", &[]).await;
        let work = queue(&*ch, "work", &dead_letter_to(&dead)).await;
        publish(&*ch, "", &work, "bad").await;
        let mut rx = ch.consume(&work, 1, false).await.unwrap();
        let got = next(&mut rx).await;
        ch.settle(got.tag, Settle::Discard).await.unwrap();
        let letter = get_eventually(&*ch, &dead).await;
        assert_eq!(letter.death(), (work.clone(), "rejected".into(), 1));
        // Sent back to the work queue with its history, and rejected again.
        ch.publish("", &work, false, letter.properties.clone(), "bad")
            .await
            .unwrap();
        let got = next(&mut rx).await;
        ch.settle(got.tag, Settle::Discard).await.unwrap();
        let letter = get_eventually(&*ch, &dead).await;
        assert_eq!(letter.death(), (work.clone(), "rejected".into(), 2));
        ch.delete_queue(&work).await;
        ch.delete_queue(&dead).await;
    }

    pub(crate) async fn drop_head_dead_letters_the_oldest_as_maxlen(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let dead = queue(&*ch, "heads", &[]).await;
        let mut args = dead_letter_to(&dead).to_vec();
        args.push(("x-max-length", HeaderValue::Int(1)));
        let q = queue(&*ch, "short", &args).await;
        publish(&*ch, "", &q, "old").await;
        publish(&*ch, "", &q, "new").await;
        assert_eq!(get_eventually(&*ch, &q).await.body, "new");
        let dropped = get_eventually(&*ch, &dead).await;
        assert_eq!(dropped.body, "old");
        assert_eq!(dropped.death().1, "maxlen");
        ch.delete_queue(&q).await;
        ch.delete_queue(&dead).await;
    }
}

pub(crate) mod quorum {
    use super::*;

    pub(crate) async fn the_delivery_limit_dead_letters_after_the_returns(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let dead = queue(&*ch, "dead", &[]).await;
        let mut args = dead_letter_to(&dead).to_vec();
        args.push(("x-queue-type", text("quorum")));
        args.push(("x-delivery-limit", HeaderValue::Int(1)));
        let q = queue(&*ch, "limited", &args).await;
        publish(&*ch, "", &q, "poison").await;
        let mut rx = ch.consume(&q, 1, false).await.unwrap();
        let first = next(&mut rx).await;
        assert_eq!(first.header("x-delivery-count"), None);
        ch.settle(first.tag, Settle::Requeue).await.unwrap();
        let second = next(&mut rx).await;
        assert_eq!(
            second.header("x-delivery-count"),
            Some(&HeaderValue::Int(1))
        );
        assert!(second.redelivered);
        ch.settle(second.tag, Settle::Requeue).await.unwrap();
        let letter = get_eventually(&*ch, &dead).await;
        assert_eq!(letter.body, "poison");
        assert_eq!(letter.death().1, "delivery_limit");
        ch.delete_queue(&q).await;
        ch.delete_queue(&dead).await;
    }
}

pub(crate) mod reply_to {
    use super::*;

    pub(crate) async fn direct_reply_to_reaches_the_requester(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let client = conn.channel().await;
        let server = conn.channel().await;
        let q = queue(&*server, "rpc", &[]).await;
        let mut replies = client
            .consume("amq.rabbitmq.reply-to", 0, true)
            .await
            .unwrap();
        let p = Properties {
            reply_to: Some("amq.rabbitmq.reply-to".into()),
            ..Properties::default()
        };
        client.publish("", &q, false, p, "ping").await.unwrap();
        let mut requests = server.consume(&q, 1, false).await.unwrap();
        let request = next(&mut requests).await;
        let reply_to = request.properties.reply_to.clone().unwrap();
        assert!(reply_to.starts_with("amq.rabbitmq.reply-to."), "{reply_to}");
        server
            .publish("", &reply_to, false, Properties::default(), "pong")
            .await
            .unwrap();
        assert_eq!(next(&mut replies).await.body, "pong");
        server.settle(request.tag, Settle::Ack).await.unwrap();
        server.delete_queue(&q).await;
    }
}

pub(crate) mod errors {
    use super::*;

    pub(crate) async fn a_passive_declare_of_a_missing_queue_is_not_found(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let name = unique("missing");
        let (code, reply) = ch
            .declare_queue(&name, true, false, &Headers::new(), true)
            .await
            .unwrap_err();
        assert_eq!(
            (code, reply),
            (404, format!("NOT_FOUND - no queue '{name}' in vhost '/'"))
        );
    }

    pub(crate) async fn an_inequivalent_redeclare_is_a_precondition_failure(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let q = queue(&*ch, "durable", &[]).await;
        let (code, reply) = ch
            .declare_queue(&q, false, false, &Headers::new(), false)
            .await
            .unwrap_err();
        assert_eq!(code, 406);
        assert!(
            reply.starts_with(&format!(
                "PRECONDITION_FAILED - inequivalent arg 'durable' for queue '{q}' in vhost '/'"
            )),
            "{reply}"
        );
        let ch = conn.channel().await;
        let x = unique("typed");
        ch.declare_exchange(&x, ExchangeKind::Direct, &Headers::new())
            .await
            .unwrap();
        let (code, reply) = ch
            .declare_exchange(&x, ExchangeKind::Topic, &Headers::new())
            .await
            .unwrap_err();
        assert_eq!(
            (code, reply),
            (406, format!("PRECONDITION_FAILED - inequivalent arg 'type' for exchange '{x}' in vhost '/': received 'topic' but current is 'direct'"))
        );
        let ch = conn.channel().await;
        ch.delete_queue(&q).await;
        ch.delete_exchange(&x).await;
    }

    pub(crate) async fn a_publish_to_a_missing_exchange_is_not_found(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let x = unique("absent");
        let (code, reply) = ch
            .publish(&x, "k", false, Properties::default(), "m")
            .await
            .unwrap_err();
        assert_eq!(
            (code, reply),
            (404, format!("NOT_FOUND - no exchange '{x}' in vhost '/'"))
        );
    }

    pub(crate) async fn an_unknown_delivery_tag_is_a_precondition_failure(broker: &dyn Broker) {
        let conn = broker.connect().await;
        let ch = conn.channel().await;
        let (code, reply) = ch.settle(4242, Settle::Ack).await.unwrap_err();
        assert_eq!(
            (code, reply.as_str()),
            (406, "PRECONDITION_FAILED - unknown delivery tag 4242")
        );
    }

    pub(crate) async fn another_connection_cannot_use_an_exclusive_queue(broker: &dyn Broker) {
        let owner = broker.connect().await;
        let other = broker.connect().await;
        let name = unique("mine");
        let mine = owner.channel().await;
        mine.declare_queue(&name, false, true, &Headers::new(), false)
            .await
            .unwrap();
        let (code, reply) = other
            .channel()
            .await
            .declare_queue(&name, false, true, &Headers::new(), false)
            .await
            .unwrap_err();
        assert_eq!(code, 405);
        assert!(reply.starts_with(&format!("RESOURCE_LOCKED - cannot obtain exclusive access to locked queue '{name}' in vhost '/'")), "{reply}");
        owner.close().await;
        other.close().await;
    }
}

pub(crate) mod recovery {
    use super::*;

    pub(crate) async fn a_lost_connection_requeues_and_takes_its_exclusive_queues(
        broker: &dyn Broker,
    ) {
        let keeper = broker.connect().await;
        let ch = keeper.channel().await;
        let q = queue(&*ch, "held", &[]).await;
        publish(&*ch, "", &q, "in flight").await;
        let lost = broker.connect().await;
        let exclusive = unique("exclusive");
        let consumer = lost.channel().await;
        consumer
            .declare_queue(&exclusive, false, true, &Headers::new(), false)
            .await
            .unwrap();
        let mut rx = consumer.consume(&q, 10, false).await.unwrap();
        assert_eq!(next(&mut rx).await.body, "in flight");
        lost.close().await;
        let got = get_eventually(&*ch, &q).await;
        assert_eq!((got.body.as_str(), got.redelivered), ("in flight", true));
        let check = keeper.channel().await;
        let (code, _) = check
            .declare_queue(&exclusive, false, false, &Headers::new(), true)
            .await
            .unwrap_err();
        assert_eq!(code, 404, "the exclusive queue went with its connection");
        ch.delete_queue(&q).await;
    }
}
