"""Device identity and enrolment (keys, CSR, certificates, claim tokens); not built yet."""
