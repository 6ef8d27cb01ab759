variable "jurisdiction" {
  description = "The jurisdiction whose change table this feed reads (feed.toml [feed] jurisdiction)."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,15}$", var.jurisdiction))
    error_message = "jurisdiction must be 1-16 lowercase letters, digits or dashes."
  }
}

variable "feed_id" {
  description = "The feed's name: its lease and checkpoints are kept under it. The same in every region of the jurisdiction, so that they share one lease."
  type        = string
  default     = "main"
}

variable "durable_table" {
  description = "The jurisdiction's change table (the jurisdiction module's change_table_name); its replica in this region is read."
  type        = string
}

variable "durable_bucket" {
  description = "This region's snapshot bucket (changes too large for an item are objects there)."
  type        = string
}

variable "kms_key_arn" {
  description = "The jurisdiction's KMS key in this region (the table's and the bucket's)."
  type        = string
}

variable "control_table" {
  description = "The control-plane table whose tenant records carry each tenant's webhook allow-list."
  type        = string
}

variable "control_region" {
  description = "Region of the control-plane table."
  type        = string
}

variable "control_kms_key_arn" {
  description = "KMS key of the control-plane table, when it differs from kms_key_arn (null: the same)."
  type        = string
  default     = null
}

variable "webhooks" {
  description = "One webhook per tenant: its URL, the hosts the tenant allows (empty: any public host), whether it may reach private addresses, and the Secrets Manager secret holding its signing secrets (one per line, the current one first; two during a rotation)."
  type = list(object({
    tenant        = string
    url           = string
    allowed_hosts = list(string)
    allow_private = bool
    secret_arn    = string
  }))
  default = []

  validation {
    condition     = length(distinct([for w in var.webhooks : w.tenant])) == length(var.webhooks)
    error_message = "give each tenant one webhook."
  }
}

variable "webhook_ports" {
  description = "TCP ports the feed may connect out to (443: AWS APIs and https webhooks)."
  type        = list(number)
  default     = [443]
}

variable "lease_ms" {
  description = "How long the feed's lease lasts without renewal: after the holder stops, another region's feed takes over this late."
  type        = number
  default     = 30000
}

variable "poll_interval_ms" {
  description = "How often the stream is read again when it had nothing new."
  type        = number
  default     = 500
}

variable "vpc_id" {
  description = "VPC of the feed instance."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets of the feed instance (private: it only connects out)."
  type        = list(string)
}

variable "metrics_cidr" {
  description = "The only CIDR that may reach the metrics port."
  type        = string
}

variable "metrics_port" {
  description = "TCP port of /metrics, /healthz, /readyz."
  type        = number
  default     = 9102
}

variable "instance_type" {
  description = "Instance type of the feed."
  type        = string
  default     = "c7g.medium"
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI id (Amazon Linux 2023; match the architecture of instance_type)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
}

variable "meridian_binary_url" {
  description = "Where the meridian binary is downloaded from at boot: s3://bucket/key or https://..."
  type        = string
}

variable "meridian_binary_sha256" {
  description = "SHA-256 (hex) of the meridian binary."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.meridian_binary_sha256))
    error_message = "meridian_binary_sha256 must be 64 lowercase hex characters."
  }
}

variable "binary_bucket_arn" {
  description = "ARN of the S3 bucket holding the binary, when meridian_binary_url is s3://..."
  type        = string
  default     = null
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore (Session Manager access)."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
