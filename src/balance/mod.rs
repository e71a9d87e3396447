//! Backend selection (placeholder until the balance module lands).
