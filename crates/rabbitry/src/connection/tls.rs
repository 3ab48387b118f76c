//! TLS for `amqps://`: the settings (CA, client certificate, server name),
//! a rustls client on the `ring` provider built afresh for each connect (so
//! renewed certificate files are picked up by the next reconnect), and the
//! plain words for why a handshake failed.

use std::path::PathBuf;

/// TLS settings of a connection: the `tls = { ... }` table of a
/// configuration. A URL's query string (`cacertfile`, `certfile`,
/// `keyfile`, `server_name_indication`, `verify`) overrides them for that
/// URL. They apply to `amqps://` URLs only.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct TlsSettings {
    /// PEM file of the certificate authorities that sign the brokers'
    /// certificates. Unset: the system's root certificates.
    pub ca_file: Option<PathBuf>,
    /// PEM file of the client's certificate chain, for mutual TLS (and the
    /// `external` auth mechanism). Needs `key_file`.
    pub cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub key_file: Option<PathBuf>,
    /// The name the broker's certificate must carry. Unset: the URL's host.
    pub server_name: Option<String>,
    /// Accepts any certificate from the broker: anyone on the path can read
    /// and change the traffic. For a broker under test only; every connect
    /// logs a warning while it is set.
    pub danger_skip_verification: bool,
}

impl TlsSettings {
    crate::setters::setters! {
        /// Sets the PEM file of the certificate authorities.
        ca_file: some into PathBuf;
        /// Sets the PEM file of the client's certificate chain.
        cert_file: some into PathBuf;
        /// Sets the PEM file of the client certificate's private key.
        key_file: some into PathBuf;
        /// Sets the name the broker's certificate must carry.
        server_name: some into String;
        /// Accepts any certificate from the broker (for tests only).
        danger_skip_verification: bool;
    }

    /// Checks the one rule of these settings: a client certificate comes
    /// with its key, or neither is set (mutual TLS needs both).
    pub fn validate(&self) -> crate::Result<()> {
        match (&self.cert_file, &self.key_file) {
            (Some(_), None) => Err(crate::Error::invalid_setting(
                "cert_file",
                "is set without key_file: set both (mutual TLS), or neither",
            )),
            (None, Some(_)) => Err(crate::Error::invalid_setting(
                "key_file",
                "is set without cert_file: set both (mutual TLS), or neither",
            )),
            _ => Ok(()),
        }
    }

    /// These settings with a URL's own TLS options laid over them: what a
    /// connect to that URL uses.
    pub fn with_url(&self, url: &super::UrlOptions) -> TlsSettings {
        let over = &url.tls;
        TlsSettings {
            ca_file: over.ca_file.clone().or_else(|| self.ca_file.clone()),
            cert_file: over.cert_file.clone().or_else(|| self.cert_file.clone()),
            key_file: over.key_file.clone().or_else(|| self.key_file.clone()),
            server_name: over
                .server_name
                .clone()
                .or_else(|| self.server_name.clone()),
            danger_skip_verification: url
                .verify
                .map_or(self.danger_skip_verification, |verify| !verify),
        }
    }
}

#[cfg(feature = "tls")]
pub(super) use client::{explain, Handshake};

#[cfg(feature = "tls")]
mod client {
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    use amqprs::tls::TlsAdaptor;
    use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
    use rustls::client::WebPkiServerVerifier;
    use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
    use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore};

    use super::TlsSettings;
    use crate::connection::Endpoint;
    use crate::error::{Error, ErrorKind, Result};

    /// One connect's TLS client, and what its verifier thought of the
    /// broker's certificate (rustls's own error, before the client library
    /// turns it into text).
    pub(in crate::connection) struct Handshake {
        pub(in crate::connection) adaptor: TlsAdaptor,
        verdict: Arc<Mutex<Option<rustls::Error>>>,
        server_name: String,
    }

    impl Handshake {
        /// Reads the files and builds the client for `ep`.
        pub(in crate::connection) fn new(tls: &TlsSettings, ep: &Endpoint) -> Result<Handshake> {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let verdict = Arc::new(Mutex::new(None));
            let verifier: Arc<dyn ServerCertVerifier> = if tls.danger_skip_verification {
                tracing::warn!(
                    node = %ep.address(),
                    "TLS certificate verification is OFF (danger_skip_verification / verify=verify_none): \
                     the broker is not authenticated"
                );
                Arc::new(AcceptAny(provider.clone()))
            } else {
                let roots = Arc::new(roots(tls.ca_file.as_deref())?);
                let inner = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
                    .build()
                    .map_err(|e| {
                        Error::config(format!("TLS: cannot use the root certificates: {e}"))
                    })?;
                Arc::new(Recording {
                    inner,
                    verdict: verdict.clone(),
                })
            };
            let builder = ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                .map_err(|e| Error::config(format!("TLS: {e}")))?
                .dangerous()
                .with_custom_certificate_verifier(verifier);
            // A URL's options can set one of the pair: check what is used.
            tls.validate().map_err(|e| e.config_of("TLS"))?;
            let config = match (&tls.cert_file, &tls.key_file) {
                (Some(cert), Some(key)) => builder
                    .with_client_auth_cert(certificates(cert, "client certificate")?, private_key(key)?)
                    .map_err(|e| {
                        Error::config(format!(
                            "TLS: the client certificate {} and key {} cannot be used together: {e}",
                            cert.display(),
                            key.display()
                        ))
                    })?,
                _ => builder.with_no_client_auth(),
            };
            let server_name = tls.server_name.clone().unwrap_or_else(|| ep.host.clone());
            ServerName::try_from(server_name.as_str()).map_err(|_| {
                Error::config(format!("TLS: `{server_name}` is not a valid server name"))
            })?;
            Ok(Handshake {
                adaptor: TlsAdaptor::new(
                    tokio_rustls::TlsConnector::from(Arc::new(config)),
                    server_name.clone(),
                ),
                verdict,
                server_name,
            })
        }

        /// Why the certificate check failed, if it did.
        pub(in crate::connection) fn rejected(&self, ep: &Endpoint) -> Option<Error> {
            let verdict = self.verdict.lock().ok()?.take()?;
            let address = ep.address();
            let name = &self.server_name;
            let message = match &verdict {
                rustls::Error::InvalidCertificate(
                    CertificateError::UnknownIssuer | CertificateError::BadSignature,
                ) => format!(
                    "{address}: TLS: certificate not trusted: no known authority signed the broker's \
                     certificate (set tls.ca_file or the URL's cacertfile to the CA that did)"
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
                ) => format!(
                    "{address}: TLS: name mismatch: the broker's certificate is not valid for `{name}` \
                     (connect by a name the certificate lists, or set tls.server_name / server_name_indication)"
                ),
                rustls::Error::InvalidCertificate(
                    CertificateError::Expired | CertificateError::ExpiredContext { .. },
                ) => format!("{address}: TLS: the broker's certificate has expired"),
                rustls::Error::InvalidCertificate(
                    CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. },
                ) => format!("{address}: TLS: the broker's certificate is not valid yet (check the clocks)"),
                other => format!("{address}: TLS: the broker's certificate was refused: {other}"),
            };
            Some(Error::new(ErrorKind::Tls, message).with_source(verdict))
        }
    }

    /// Says what a failed TLS connect means when the certificate was not
    /// the problem: a plain port, or the broker refusing our certificate.
    pub(in crate::connection) fn explain(ep: &Endpoint, text: &str) -> Option<Error> {
        let lower = text.to_ascii_lowercase();
        let address = ep.address();
        let message = if lower.contains("corrupt message") || lower.contains("invalidcontenttype") {
            format!(
                "{address}: TLS: the port answered without TLS: it is a plain AMQP port; use amqp:// \
                 there, or the broker's TLS port (usually 5671)"
            )
        } else if lower.contains("received fatal alert") {
            let alert = text.rsplit(':').next().unwrap_or_default().trim();
            format!(
                "{address}: TLS: the broker ended the handshake ({alert}): it did not accept the client \
                 certificate, or requires one (set tls.cert_file and tls.key_file)"
            )
        } else {
            return None;
        };
        Some(Error::new(ErrorKind::Tls, message))
    }

    fn read(path: &Path, what: &str) -> Result<Vec<u8>> {
        std::fs::read(path).map_err(|e| {
            Error::config(format!(
                "TLS: cannot read the {what} file {}: {e}",
                path.display()
            ))
        })
    }

    fn certificates(path: &Path, what: &str) -> Result<Vec<CertificateDer<'static>>> {
        let pem = read(path, what)?;
        let certs = CertificateDer::pem_slice_iter(&pem)
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::config(format!("TLS: {what} file {}: {e}", path.display())))?;
        if certs.is_empty() {
            return Err(Error::config(format!(
                "TLS: {what} file {} holds no PEM certificate",
                path.display()
            )));
        }
        Ok(certs)
    }

    fn private_key(path: &Path) -> Result<PrivateKeyDer<'static>> {
        let pem = read(path, "private key")?;
        PrivateKeyDer::from_pem_slice(&pem).map_err(|e| {
            Error::config(format!(
                "TLS: private key file {} holds no usable PEM key: {e}",
                path.display()
            ))
        })
    }

    /// The CA file's certificates, or the system's root certificates.
    fn roots(ca_file: Option<&Path>) -> Result<RootCertStore> {
        let mut roots = RootCertStore::empty();
        match ca_file {
            Some(path) => {
                for cert in certificates(path, "CA")? {
                    roots.add(cert).map_err(|e| {
                        Error::config(format!("TLS: CA file {}: {e}", path.display()))
                    })?;
                }
            }
            None => {
                let found = rustls_native_certs::load_native_certs();
                roots.add_parsable_certificates(found.certs);
                if roots.is_empty() {
                    return Err(Error::config(
                        "TLS: no system root certificates found (install ca-certificates, or set \
                         tls.ca_file / the URL's cacertfile)",
                    ));
                }
            }
        }
        Ok(roots)
    }

    /// The standard verifier, keeping its error for [`Handshake::rejected`].
    #[derive(Debug)]
    struct Recording {
        inner: Arc<WebPkiServerVerifier>,
        verdict: Arc<Mutex<Option<rustls::Error>>>,
    }

    impl ServerCertVerifier for Recording {
        fn verify_server_cert(
            &self,
            end_entity: &CertificateDer<'_>,
            intermediates: &[CertificateDer<'_>],
            server_name: &ServerName<'_>,
            ocsp_response: &[u8],
            now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            let result = self.inner.verify_server_cert(
                end_entity,
                intermediates,
                server_name,
                ocsp_response,
                now,
            );
            if let (Err(err), Ok(mut slot)) = (&result, self.verdict.lock()) {
                *slot = Some(err.clone());
            }
            result
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls12_signature(message, cert, dss)
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            self.inner.verify_tls13_signature(message, cert, dss)
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.inner.supported_verify_schemes()
        }
    }

    /// `danger_skip_verification`: any certificate is taken; the handshake's
    /// signatures are still checked, so the session key is the server's.
    #[derive(Debug)]
    struct AcceptAny(Arc<CryptoProvider>);

    impl ServerCertVerifier for AcceptAny {
        fn verify_server_cert(
            &self,
            _end_entity: &CertificateDer<'_>,
            _intermediates: &[CertificateDer<'_>],
            _server_name: &ServerName<'_>,
            _ocsp_response: &[u8],
            _now: UnixTime,
        ) -> std::result::Result<ServerCertVerified, rustls::Error> {
            Ok(ServerCertVerified::assertion())
        }

        fn verify_tls12_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls12_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            verify_tls13_signature(
                message,
                cert,
                dss,
                &self.0.signature_verification_algorithms,
            )
        }

        fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
            self.0.signature_verification_algorithms.supported_schemes()
        }
    }
}
