output "arn" {
  description = "ARN of the load balancer (for more listeners)"
  value       = aws_lb.this.arn
}

output "arn_suffix" {
  description = "ARN suffix of the load balancer (CloudWatch dimension LoadBalancer)"
  value       = aws_lb.this.arn_suffix
}

output "dns_name" {
  description = "DNS name of the load balancer"
  value       = aws_lb.this.dns_name
}

output "zone_id" {
  description = "Route 53 zone id of the load balancer, for alias records"
  value       = aws_lb.this.zone_id
}

output "security_group_id" {
  description = "Security group of the load balancer (targets admit health checks from it)"
  value       = aws_security_group.nlb.id
}

output "target_group_arn" {
  description = "ARN of the QUIC target group (for the autoscaling group)"
  value       = aws_lb_target_group.quic.arn
}

output "target_group_arn_suffix" {
  description = "ARN suffix of the QUIC target group (CloudWatch dimension TargetGroup)"
  value       = aws_lb_target_group.quic.arn_suffix
}
