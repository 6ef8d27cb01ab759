output "region" {
  description = "Region of this storage (the provider's region)."
  value       = local.region
}

output "jurisdiction" {
  description = "Jurisdiction this storage belongs to."
  value       = var.jurisdiction
}

output "bucket_name" {
  description = "Snapshot bucket name: relay config [durable] bucket."
  value       = aws_s3_bucket.snapshots.bucket

  depends_on = [
    aws_s3_bucket_versioning.snapshots,
    aws_s3_bucket_object_lock_configuration.snapshots,
    aws_s3_bucket_server_side_encryption_configuration.snapshots,
  ]
}

output "bucket_arn" {
  description = "Snapshot bucket ARN."
  value       = aws_s3_bucket.snapshots.arn
}

output "kms_key_arn" {
  description = "ARN of this region's customer-managed KMS key."
  value       = aws_kms_key.this.arn
}

output "kms_alias" {
  description = "Alias of this region's KMS key."
  value       = aws_kms_alias.this.name
}
