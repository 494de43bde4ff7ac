"""Device identity and enrolment: keys, CSR, certificates, claim-token enrolment and renewal
(`edge-agent provision` / `renew`); docs/provisioning.md."""
