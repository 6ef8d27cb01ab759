output "record_name" {
  description = "Name clients resolve to reach the nearest healthy router."
  value       = var.record_name
}

output "health_check_ids" {
  description = "Route 53 health check per router deployment."
  value       = { for k, hc in aws_route53_health_check.router : k => hc.id }
}
