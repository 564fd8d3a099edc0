"""A/B experiments at the gateway: assignment on the request path (`service`), mirrored shadow
requests (`shadow`), the guardrail controller (`controller`), and what it reads (`sources`,
`analysis`)."""
