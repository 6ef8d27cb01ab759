variable "name" {
  description = "Name of this router deployment, e.g. \"router-eu-west-1\"."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,23}$", var.name))
    error_message = "name must be 1-24 lowercase letters, digits or dashes."
  }
}

variable "control_tables" {
  description = "Control-plane table of every jurisdiction: jurisdiction => { region, table, kms_key_arn }. The router reads and writes placements there."
  type = map(object({
    region      = string
    table       = string
    kms_key_arn = string
  }))
}

variable "jurisdictions" {
  description = "Jurisdictions the router places tenants in: name => regions (disjoint). Rendered into router.toml [jurisdictions]."
  type        = map(list(string))
}

variable "cells" {
  description = "The cell directory: the router_cell output of every cell module (id, region, jurisdiction, weight, endpoint = QUIC host:port, admin = probe host:port, gateway = the cell's wss:// URL). Rendered into router.toml [[cells]]."
  type = list(object({
    id           = string
    region       = string
    jurisdiction = string
    weight       = number
    endpoint     = string
    admin        = string
    gateway      = string
  }))

  validation {
    condition     = alltrue([for cell in var.cells : contains(keys(var.jurisdictions), cell.jurisdiction) && contains(var.jurisdictions[cell.jurisdiction], cell.region)])
    error_message = "every cell's region must be one of its jurisdiction's regions."
  }
}

variable "locate_http_port" {
  description = "TCP port of the router's HTTP locate for browser apps (router config [router] http_listen); the load balancer's TLS listener forwards to it."
  type        = number
  default     = 8081
}

variable "locate_tls_port" {
  description = "TCP port of the load balancer's TLS listener for the HTTP locate (https://)."
  type        = number
  default     = 443
}

variable "locate_certificate_arn" {
  description = "ACM certificate for the HTTP locate's TLS listener: browser apps call https://<router name>:<locate_tls_port>/locate?tenant=T."
  type        = string
}

variable "locate_origins" {
  description = "Browser origins allowed to call the HTTP locate (router config [router] http_origins; \"*\": any)."
  type        = list(string)
  default     = []
}

variable "cell_probe_port" {
  description = "TCP port of the cells' readiness probe listener (their load balancer's metrics port)."
  type        = number
  default     = 9090
}

variable "vpc_id" {
  description = "VPC of the routers."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets of the routers and their load balancer."
  type        = list(string)
}

variable "public_addresses" {
  description = "Give routers public IPv4 addresses (and advertise them)."
  type        = bool
  default     = true
}

variable "client_cidrs" {
  description = "CIDRs that may reach the QUIC port."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "metrics_cidr" {
  description = "The only CIDR (besides the load balancer's health checks) that may reach the metrics port."
  type        = string
}

variable "quic_port" {
  description = "UDP port of QUIC."
  type        = number
  default     = 4433
}

variable "metrics_port" {
  description = "TCP port of /metrics, /healthz, /readyz."
  type        = number
  default     = 9090
}

variable "instance_type" {
  description = "Instance type of the routers."
  type        = string
  default     = "c7g.medium"
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI id (Amazon Linux 2023; match the architecture of instance_type)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
}

variable "min_size" {
  description = "Minimum number of routers."
  type        = number
  default     = 2
}

variable "max_size" {
  description = "Maximum number of routers."
  type        = number
  default     = 4
}

variable "desired_capacity" {
  description = "Desired number of routers."
  type        = number
  default     = 2
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

variable "tls_secret_arn" {
  description = "Secrets Manager secret {\"cert\", \"key\"} (PEM) of the router's QUIC endpoint. Null: self-signed (testing only)."
  type        = string
  default     = null
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore (Session Manager access)."
  type        = bool
  default     = true
}

variable "alarm_actions" {
  description = "ARNs notified when the health alarm fires or recovers."
  type        = list(string)
  default     = []
}

variable "deletion_protection" {
  description = "Deletion protection of the load balancer."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
