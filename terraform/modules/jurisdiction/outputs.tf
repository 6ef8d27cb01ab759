output "jurisdiction" {
  description = "Jurisdiction name: relay config [node] jurisdiction."
  value       = var.jurisdiction
}

output "regions" {
  description = "The jurisdiction's regions (primary first)."
  value       = var.regions
}

output "change_table_name" {
  description = "Change table name: relay config [durable] table."
  value       = aws_dynamodb_table.changes.name
}

output "change_table_arn" {
  description = "Change table ARN in the primary region."
  value       = aws_dynamodb_table.changes.arn
}

output "change_table_stream_arn" {
  description = "Change table stream ARN in the primary region."
  value       = aws_dynamodb_table.changes.stream_arn
}

output "replica_regions" {
  description = "Regions holding a replica of the change table besides the primary."
  value       = local.replica_regions
}

output "control_table_name" {
  description = "Control-plane table name (null when disabled)."
  value       = var.control_table_enabled ? aws_dynamodb_table.control[0].name : null
}

output "control_table_region" {
  description = "Primary region of the control-plane table."
  value       = local.primary_region
}
