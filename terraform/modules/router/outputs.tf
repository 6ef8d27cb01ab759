output "name" {
  description = "Name of this router deployment."
  value       = var.name
}

output "region" {
  description = "Region of this router deployment."
  value       = local.region
}

output "nlb_dns_name" {
  description = "DNS name of the router load balancer."
  value       = module.lb.dns_name
}

output "nlb_zone_id" {
  description = "Route 53 zone id of the router load balancer (for alias records)."
  value       = module.lb.zone_id
}

output "health_alarm_name" {
  description = "CloudWatch alarm that is in ALARM when no router here is healthy."
  value       = aws_cloudwatch_metric_alarm.no_healthy_router.alarm_name
}

output "router_config" {
  description = "The rendered router.toml (@NODE_ID@ and @ADVERTISE@ are filled in at boot)."
  value       = local.router_config
}

output "autoscaling_group_name" {
  description = "Autoscaling group of the routers."
  value       = aws_autoscaling_group.router.name
}
