//! What the deployment checks share: rendering the Kustomize variants and reading the
//! monitoring queries (`render`), and checking PromQL queries against metrics that a
//! binary actually exposes (`promql`).

pub mod promql;
pub mod render;
