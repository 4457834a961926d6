"""Governance: safety policies (what a consumer's prompts are checked for), Azure AI Content Safety and Language PII
calls, the refusal they lead to, and the audit trail (docs/safety.md)."""
