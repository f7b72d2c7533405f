"""nvml-remediator: Alertmanager webhooks to safe GPU remediation. Never imports the collector."""
