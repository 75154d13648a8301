//! podnet: an eBPF node networking agent for Kubernetes.
