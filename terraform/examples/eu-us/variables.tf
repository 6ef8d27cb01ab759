variable "jurisdictions" {
  description = "Jurisdiction => its regions, primary first. The one place this map is written: the modules below take their regions from it and terraform/tests/residency.py checks the configuration against it."
  type        = map(list(string))
  default = {
    eu = ["eu-west-1", "eu-central-1"]
    us = ["us-east-1"]
  }
}

variable "bucket_suffix" {
  description = "Suffix appended to every snapshot bucket name for global uniqueness, e.g. \"-acme\"."
  type        = string
  default     = ""
}

variable "networks" {
  description = "Existing network per region: region => { vpc_id, subnet_ids } (public subnets, one per availability zone)."
  type = map(object({
    vpc_id     = string
    subnet_ids = list(string)
  }))
}

variable "metrics_cidr" {
  description = "CIDR of the Prometheus scrapers; the only source allowed on the metrics port."
  type        = string
}

variable "router_cidrs" {
  description = "CIDRs of the routers (their public addresses or NAT), allowed to probe every cell's readiness listener."
  type        = list(string)
  default     = []
}

variable "meridian_binary_url" {
  description = "Where nodes download the meridian binary: s3://bucket/key or https://..."
  type        = string
}

variable "meridian_binary_sha256" {
  description = "SHA-256 (hex) of the meridian binary."
  type        = string
}

variable "binary_bucket_arn" {
  description = "ARN of the bucket holding the binary when meridian_binary_url is s3://..."
  type        = string
  default     = null
}

variable "tls_secret_arns" {
  description = "Per region, a Secrets Manager secret {\"cert\", \"key\"} for the QUIC endpoints. A region without one gets self-signed certificates (testing only)."
  type        = map(string)
  default     = {}
}

variable "gateway_certificate_arns" {
  description = "Per region with a cell, the ACM certificate of its gateway's TLS listener (wss://)."
  type        = map(string)
}

variable "locate_certificate_arns" {
  description = "Per region with a router, the ACM certificate of its HTTP locate's TLS listener (https://)."
  type        = map(string)
}

variable "locate_origins" {
  description = "Browser origins allowed to call the routers' HTTP locate (\"*\": any)."
  type        = list(string)
  default     = []
}

variable "tenants" {
  description = "Per jurisdiction, the tenants its cells serve and their public keys."
  type = map(list(object({
    id          = string
    public_keys = list(string)
  })))
  default = {}
}

variable "webhooks" {
  description = "Per jurisdiction, the tenants' webhooks its change feed delivers to (see modules/feed)."
  type = map(list(object({
    tenant        = string
    url           = string
    allowed_hosts = list(string)
    allow_private = bool
    secret_arn    = string
  })))
  default = {}
}

variable "zone_id" {
  description = "Route 53 hosted zone of the router entry record."
  type        = string
}

variable "router_record_name" {
  description = "Name clients resolve to reach the nearest healthy router, e.g. \"router.meridian.example.com\"."
  type        = string
}

variable "alarm_actions" {
  description = "SNS topic ARNs notified by the cells' and routers' alarms (each must be in the alarm's region)."
  type        = map(list(string))
  default     = {}
}

variable "deletion_protection" {
  description = "Deletion protection of tables and load balancers. Set false and apply before terraform destroy."
  type        = bool
  default     = true
}
