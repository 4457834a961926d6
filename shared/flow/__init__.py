"""The request flow: routes and bodies, the gateway's phases, the upstream call, usage and token counts."""
