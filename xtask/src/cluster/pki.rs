//! The cluster's certificates and kubeconfigs, made with Debian's `openssl`.
//!
//! One CA signs everything (P-256 keys, one year): the API server's serving certificate, a
//! client certificate per identity (admin, controller-manager, scheduler, the API server's
//! kubelet client, each kubelet and kube-proxy), and the service-account signing key pair.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result};

use super::layout;
use crate::cmd;

/// A client identity: certificate subject and the kubeconfig it is written to.
#[derive(Debug, Clone)]
pub struct Identity {
    /// File stem of the key, certificate and kubeconfig.
    pub stem: String,
    /// Common name: the Kubernetes user.
    pub user: String,
    /// Organization: the Kubernetes group, if any.
    pub group: Option<&'static str>,
}

impl Identity {
    fn new(stem: impl Into<String>, user: impl Into<String>, group: Option<&'static str>) -> Self {
        Self {
            stem: stem.into(),
            user: user.into(),
            group,
        }
    }
}

/// Every client identity of the cluster.
pub fn identities() -> Vec<Identity> {
    let mut all = vec![
        Identity::new("admin", "kubernetes-admin", Some("system:masters")),
        Identity::new("controller-manager", "system:kube-controller-manager", None),
        Identity::new("scheduler", "system:kube-scheduler", None),
        // The API server's client for kubelet's API (logs, exec); authorized by the
        // kubelets' webhook authorizer through this group.
        Identity::new(
            "apiserver-kubelet-client",
            "kube-apiserver-kubelet-client",
            Some("system:masters"),
        ),
        // Bound to system:node-proxier by the API server's bootstrap policy.
        Identity::new("kube-proxy", "system:kube-proxy", None),
    ];
    for node in layout::NODES {
        // The Node authorizer and NodeRestriction admission know kubelets by this name.
        all.push(Identity::new(
            format!("kubelet-{}", node.name),
            format!("system:node:{}", node.name),
            Some("system:nodes"),
        ));
    }
    all
}

/// The PKI directory.
pub fn dir() -> PathBuf {
    layout::cluster_path("pki")
}

/// `<pki>/<name>`.
pub fn file(name: &str) -> PathBuf {
    dir().join(name)
}

/// Creates the CA, the serving and client certificates, the service-account keys and a
/// kubeconfig per identity.
pub fn create() -> Result<()> {
    let dir = dir();
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "365",
        "-subj",
        "/CN=podnet-cluster-ca",
        "-keyout",
        path(&file("ca.key")),
        "-out",
        path(&file("ca.crt")),
    ])?;
    let api_sans = format!(
        "DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,\
         DNS:kubernetes.default.svc.{},IP:{},IP:{}",
        layout::CLUSTER_DOMAIN,
        layout::VPC_ROUTER,
        layout::KUBERNETES_SERVICE_IP,
    );
    sign("apiserver", "/CN=kube-apiserver", Some(&api_sans))?;
    for identity in identities() {
        let subject = match identity.group {
            Some(group) => format!("/O={group}/CN={}", identity.user),
            None => format!("/CN={}", identity.user),
        };
        sign(&identity.stem, &subject, None)?;
        write_kubeconfig(&identity)?;
    }
    openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        path(&file("sa.key")),
    ])?;
    openssl(&[
        "ec",
        "-in",
        path(&file("sa.key")),
        "-pubout",
        "-out",
        path(&file("sa.pub")),
    ])?;
    Ok(())
}

/// A key and a certificate signed by the CA for `subject`, server and client usage; `sans`
/// as `subjectAltName` when given.
fn sign(stem: &str, subject: &str, sans: Option<&str>) -> Result<()> {
    let key = file(&format!("{stem}.key"));
    let csr = file(&format!("{stem}.csr"));
    let crt = file(&format!("{stem}.crt"));
    let ext = file(&format!("{stem}.ext"));
    openssl(&[
        "req",
        "-new",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-subj",
        subject,
        "-keyout",
        path(&key),
        "-out",
        path(&csr),
    ])?;
    let mut extensions = String::from(
        "basicConstraints=critical,CA:FALSE\n\
         keyUsage=critical,digitalSignature,keyEncipherment\n\
         extendedKeyUsage=serverAuth,clientAuth\n",
    );
    if let Some(sans) = sans {
        extensions.push_str("subjectAltName=");
        extensions.push_str(sans);
        extensions.push('\n');
    }
    fs::write(&ext, extensions)?;
    openssl(&[
        "x509",
        "-req",
        "-in",
        path(&csr),
        "-CA",
        path(&file("ca.crt")),
        "-CAkey",
        path(&file("ca.key")),
        "-CAcreateserial",
        "-days",
        "365",
        "-extfile",
        path(&ext),
        "-out",
        path(&crt),
    ])?;
    fs::remove_file(&csr)?;
    fs::remove_file(&ext)?;
    Ok(())
}

/// The kubeconfig of `identity`, with certificates embedded so that it works from any mount
/// namespace: `<cluster>/<stem>.kubeconfig`.
fn write_kubeconfig(identity: &Identity) -> Result<()> {
    let ca = base64_file(&file("ca.crt"))?;
    let crt = base64_file(&file(&format!("{}.crt", identity.stem)))?;
    let key = base64_file(&file(&format!("{}.key", identity.stem)))?;
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: podnet\n  cluster:\n    \
         server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {user}\n  \
         user:\n    client-certificate-data: {crt}\n    client-key-data: {key}\n\
         contexts:\n- name: podnet\n  context:\n    cluster: podnet\n    user: {user}\n\
         current-context: podnet\n",
        server = layout::api_server_url(),
        user = identity.user,
    );
    let path = kubeconfig(&identity.stem);
    fs::write(&path, text).with_context(|| format!("writing {}", path.display()))
}

/// The kubeconfig of the identity with file stem `stem`.
pub fn kubeconfig(stem: &str) -> PathBuf {
    layout::cluster_path(&format!("{stem}.kubeconfig"))
}

fn base64_file(path: &Path) -> Result<String> {
    let bytes = fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    Ok(base64(&bytes))
}

/// Standard base64 with padding (RFC 4648), as kubeconfig's `*-data` fields take.
pub fn base64(bytes: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(bytes.len().div_ceil(3) * 4);
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn openssl(args: &[&str]) -> Result<()> {
    cmd::stdout(Command::new("openssl").args(args)).map(drop)
}

fn path(p: &Path) -> &str {
    // Every path here is built from ASCII constants.
    p.to_str().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (input, output) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(input.as_bytes()), output, "{input:?}");
        }
    }

    #[test]
    fn every_kubelet_has_its_node_identity() {
        let all = identities();
        for node in layout::NODES {
            let kubelet = all
                .iter()
                .find(|i| i.stem == format!("kubelet-{}", node.name))
                .unwrap();
            assert_eq!(kubelet.user, format!("system:node:{}", node.name));
            assert_eq!(kubelet.group, Some("system:nodes"));
        }
    }
}
