# --- Identity and residency -------------------------------------------------

variable "cell_id" {
  description = "Cell id, unique across the deployment (relay config [node] cell), e.g. \"eu-a\"."
  type        = string

  validation {
    condition     = can(regex("^[a-z0-9][a-z0-9-]{0,30}$", var.cell_id))
    error_message = "cell_id must be 1-31 lowercase letters, digits or dashes."
  }
}

variable "jurisdiction" {
  description = "Jurisdiction of the cell (relay config [node] jurisdiction)."
  type        = string
}

variable "jurisdiction_regions" {
  description = "The jurisdiction's regions; the provider's region must be one of them."
  type        = list(string)
}

variable "durable_table" {
  description = "Change table name (relay config [durable] table): the jurisdiction module's change_table_name."
  type        = string
}

variable "durable_bucket" {
  description = "Snapshot bucket of this region (relay config [durable] bucket): the region module's bucket_name."
  type        = string
}

variable "kms_key_arn" {
  description = "This region's KMS key of the jurisdiction (region module output kms_key_arn). Encrypts the gossip secret, the data volume and the logs."
  type        = string
}

variable "control_table" {
  description = "Control-plane table name, read by relays for placements."
  type        = string
  default     = "meridian-control"
}

# --- Network ------------------------------------------------------------------

variable "vpc_id" {
  description = "VPC of the cell."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets of the nodes and of the load balancer, ideally one per availability zone. Public subnets when public_addresses is true."
  type        = list(string)
}

variable "public_addresses" {
  description = "Give every node a public IPv4 address and advertise it to clients (needed for Moved{doc, node} redirects from outside the VPC)."
  type        = bool
  default     = true
}

variable "client_cidrs" {
  description = "CIDRs that may reach the QUIC port."
  type        = list(string)
  default     = ["0.0.0.0/0"]
}

variable "router_cidrs" {
  description = "CIDRs of the routers, which probe the cell's readiness (GET /readyz) through the load balancer's metrics-port listener. Empty: nothing can reach that listener."
  type        = list(string)
  default     = []
}

variable "weight" {
  description = "Capacity weight of the cell in the router's placement (rendered into the router's [[cells]] through the router_cell output)."
  type        = number
  default     = 1

  validation {
    condition     = var.weight >= 1
    error_message = "weight must be at least 1."
  }
}

variable "metrics_cidr" {
  description = "The only CIDR (besides the load balancer's health checks) that may reach the metrics port (/metrics, /healthz, /readyz)."
  type        = string
}

variable "quic_port" {
  description = "UDP port of QUIC (relay config [node] listen)."
  type        = number
  default     = 4433
}

variable "gateway_port" {
  description = "TCP port of the WebSocket gateway for automerge-repo peers (relay config [gateway] listen); the load balancer's TLS listener forwards to it."
  type        = number
  default     = 8080
}

variable "gateway_tls_port" {
  description = "TCP port of the load balancer's TLS listener for the gateway (wss://)."
  type        = number
  default     = 443
}

variable "gateway_certificate_arn" {
  description = "ACM certificate for the gateway's TLS listener (wss://); the cell's WebSocket URL is wss://<its DNS name>:<gateway_tls_port>/?token=...."
  type        = string
}

variable "api_port" {
  description = "TCP port of the HTTP API for backends (relay config [api] listen); the load balancer's TLS listener forwards to it."
  type        = number
  default     = 8090
}

variable "api_tls_port" {
  description = "TCP port of the load balancer's TLS listener for the HTTP API (https://, with the gateway's certificate)."
  type        = number
  default     = 8443
}

variable "gossip_port" {
  description = "UDP port of SWIM gossip (relay config [cell] gossip_listen)."
  type        = number
  default     = 7946
}

variable "metrics_port" {
  description = "TCP port of the metrics server (relay config [metrics] listen)."
  type        = number
  default     = 9090
}

variable "gossip_key_version" {
  description = "Version of the gossip key; increase it to generate and store a new key."
  type        = number
  default     = 1
}

variable "gossip_seeds" {
  description = "Static gossip seeds (host:port). Empty: each node discovers the running nodes of its cell by tag at boot."
  type        = list(string)
  default     = []
}

# --- Compute ------------------------------------------------------------------

variable "instance_type" {
  description = "Instance type. The default has local NVMe (see data_volume)."
  type        = string
  default     = "c7gd.large"
}

variable "ami_ssm_parameter" {
  description = "SSM parameter holding the AMI id (Amazon Linux 2023; match the architecture of instance_type)."
  type        = string
  default     = "/aws/service/ami-amazon-linux-latest/al2023-ami-kernel-default-arm64"
}

variable "min_size" {
  description = "Minimum number of nodes."
  type        = number
  default     = 3
}

variable "max_size" {
  description = "Maximum number of nodes."
  type        = number
  default     = 6
}

variable "desired_capacity" {
  description = "Desired number of nodes."
  type        = number
  default     = 3
}

variable "data_volume" {
  description = "Where the sled cache (data_dir) lives: \"nvme\" (instance store of the instance type) or \"gp3\" (an encrypted EBS volume)."
  type        = string
  default     = "nvme"

  validation {
    condition     = contains(["nvme", "gp3"], var.data_volume)
    error_message = "data_volume must be \"nvme\" or \"gp3\"."
  }
}

variable "gp3_size_gib" {
  description = "Size of the gp3 data volume when data_volume = \"gp3\"."
  type        = number
  default     = 100
}

variable "gp3_iops" {
  description = "IOPS of the gp3 data volume."
  type        = number
  default     = 6000
}

variable "gp3_throughput" {
  description = "Throughput (MiB/s) of the gp3 data volume."
  type        = number
  default     = 250
}

variable "data_dir" {
  description = "Mount point of the data volume (relay config [node] data_dir)."
  type        = string
  default     = "/var/lib/meridian"
}

variable "meridian_binary_url" {
  description = "Where the meridian binary is downloaded from at boot: s3://bucket/key or https://..."
  type        = string
}

variable "meridian_binary_sha256" {
  description = "SHA-256 (hex) of the meridian binary; the boot fails on a mismatch."
  type        = string

  validation {
    condition     = can(regex("^[0-9a-f]{64}$", var.meridian_binary_sha256))
    error_message = "meridian_binary_sha256 must be 64 lowercase hex characters."
  }
}

variable "binary_bucket_arn" {
  description = "ARN of the S3 bucket holding the binary, when meridian_binary_url is s3://... (read access is granted to the nodes)."
  type        = string
  default     = null
}

variable "tls_secret_arn" {
  description = "Secrets Manager secret holding {\"cert\": PEM chain, \"key\": PEM key} for the QUIC endpoint. Null: each node makes a self-signed certificate (testing only)."
  type        = string
  default     = null
}

variable "tenants" {
  description = "Tenants served by this cell and their token verification keys (relay config [[tenants]])."
  type = list(object({
    id          = string
    public_keys = list(string)
  }))
  default = []
}

variable "enable_ssm" {
  description = "Attach AmazonSSMManagedInstanceCore so operators reach nodes with Session Manager (no SSH)."
  type        = bool
  default     = true
}

# --- Alarms -------------------------------------------------------------------

variable "flush_lag_metric_name" {
  description = "Prometheus gauge (seconds) of the oldest change not yet Durable; scraped into CloudWatch namespace Meridian."
  type        = string
  default     = "meridian_flush_oldest_unflushed_age_seconds"
}

variable "flush_lag_alarm_seconds" {
  description = "Alarm when the oldest unflushed change of any node is older than this for 5 minutes."
  type        = number
  default     = 30
}

variable "alarm_actions" {
  description = "ARNs (e.g. SNS topics) notified when an alarm fires or recovers."
  type        = list(string)
  default     = []
}

variable "log_retention_days" {
  description = "Retention of the CloudWatch log group that carries scraped metrics."
  type        = number
  default     = 365
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
