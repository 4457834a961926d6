"""A simulated Azure OpenAI region: realistic bodies and streams, its own TPM capacity, and fault injection."""
