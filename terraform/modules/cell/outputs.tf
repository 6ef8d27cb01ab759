# Each output that feeds the relay config names its key; see the mapping table
# in terraform/README.md.

output "cell_id" {
  description = "[node] cell"
  value       = var.cell_id
}

output "region" {
  description = "[node] region and [durable] region"
  value       = local.region
}

output "jurisdiction" {
  description = "[node] jurisdiction"
  value       = var.jurisdiction
}

output "durable_table" {
  description = "[durable] table"
  value       = var.durable_table
}

output "durable_bucket" {
  description = "[durable] bucket"
  value       = var.durable_bucket
}

output "quic_listen" {
  description = "[node] listen"
  value       = "0.0.0.0:${var.quic_port}"
}

output "gossip_listen" {
  description = "[cell] gossip_listen"
  value       = "0.0.0.0:${var.gossip_port}"
}

output "metrics_listen" {
  description = "[metrics] listen"
  value       = "0.0.0.0:${var.metrics_port}"
}

output "data_dir" {
  description = "[node] data_dir (mount point of the NVMe or gp3 data volume)"
  value       = var.data_dir
}

output "gossip_key_secret_arn" {
  description = "Secrets Manager secret written to [cell] key_file (/etc/meridian/gossip.key) at boot"
  value       = aws_secretsmanager_secret.gossip.arn
}

output "relay_config" {
  description = "The rendered relay.toml; @NODE_ID@ ([node] id = instance id), @ADVERTISE@ ([node] advertise), @GOSSIP_ADVERTISE@ ([cell] gossip_advertise, the private IP) and @SEEDS@ ([cell] seeds) are filled in at boot"
  value       = local.relay_config
}

output "nlb_dns_name" {
  description = "DNS name of the cell's UDP load balancer (QUIC entry to any node of the cell)"
  value       = module.lb.dns_name
}

output "router_cell" {
  description = "This cell as the router module's cells variable lists it: id, region, jurisdiction, weight, endpoint (QUIC through the load balancer), admin (the readiness probe listener) and gateway (its wss:// URL)"
  value = {
    id           = var.cell_id
    region       = local.region
    jurisdiction = var.jurisdiction
    weight       = var.weight
    endpoint     = "${module.lb.dns_name}:${var.quic_port}"
    admin        = "${module.lb.dns_name}:${var.metrics_port}"
    gateway      = "wss://${module.lb.dns_name}:${var.gateway_tls_port}/"
  }
}

output "nlb_zone_id" {
  description = "Route 53 zone id of the load balancer, for alias records"
  value       = module.lb.zone_id
}

output "autoscaling_group_name" {
  description = "Autoscaling group of the relay nodes"
  value       = aws_autoscaling_group.node.name
}

output "node_role_arn" {
  description = "IAM role of the relay nodes"
  value       = aws_iam_role.node.arn
}

output "node_security_group_id" {
  description = "Security group of the relay nodes"
  value       = aws_security_group.node.id
}

output "alarm_arns" {
  description = "CloudWatch alarms of the cell"
  value = {
    flush_lag       = aws_cloudwatch_metric_alarm.flush_lag.arn
    unhealthy_nodes = aws_cloudwatch_metric_alarm.unhealthy_nodes.arn
    too_few_nodes   = aws_cloudwatch_metric_alarm.too_few_nodes.arn
  }
}

output "api_url" {
  description = "The cell's HTTP API for backends (Authorization: Bearer <token>)"
  value       = "https://${module.lb.dns_name}:${var.api_tls_port}/v1/"
}

output "gateway_url" {
  description = "The cell's WebSocket URL for automerge-repo peers (add ?token=...)"
  value       = "wss://${module.lb.dns_name}:${var.gateway_tls_port}/"
}
