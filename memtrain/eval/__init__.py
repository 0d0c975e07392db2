"""The evaluation layer: measure (generate + score), evaluate, the audit. Imports core and the
methods (attack, mitigations, metrics, data); never train or testbed."""
