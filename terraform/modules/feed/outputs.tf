output "role_arn" {
  description = "The feed instances' IAM role."
  value       = aws_iam_role.feed.arn
}

output "security_group_id" {
  description = "The feed instances' security group."
  value       = aws_security_group.feed.id
}

output "autoscaling_group_name" {
  description = "The feed's autoscaling group (one instance)."
  value       = aws_autoscaling_group.feed.name
}

output "feed_config" {
  description = "The rendered feed.toml (no secrets: those are files the boot script writes)."
  value       = local.feed_config
}
