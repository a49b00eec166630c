"""The verifier: target engine, acceptance rules, batching and the verifier service."""
