output "target_group_arn" {
  description = "The target group, for the autoscaling group"
  value       = aws_lb_target_group.this.arn
}
