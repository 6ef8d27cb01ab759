variable "name" {
  description = "Name prefix of the load balancer and its security group (the calling module's resource name, e.g. \"meridian-eu-a\")."
  type        = string
}

variable "description" {
  description = "Description of the load balancer's security group."
  type        = string
}

variable "role" {
  description = "What the targets are, for descriptions: \"relay nodes\" or \"routers\"."
  type        = string
}

variable "target_group_prefix" {
  description = "name_prefix of the QUIC target group (at most 6 characters)."
  type        = string

  validation {
    condition     = length(var.target_group_prefix) <= 6
    error_message = "target_group_prefix must be at most 6 characters."
  }
}

variable "vpc_id" {
  description = "VPC of the load balancer and its targets."
  type        = string
}

variable "subnet_ids" {
  description = "Subnets of the load balancer."
  type        = list(string)
}

variable "client_cidrs" {
  description = "CIDRs that may reach the QUIC port."
  type        = list(string)
}

variable "target_security_group_id" {
  description = "Security group of the targets (QUIC and health checks go only there)."
  type        = string
}

variable "quic_port" {
  description = "UDP port of QUIC."
  type        = number
}

variable "metrics_port" {
  description = "TCP port of the targets' /healthz (the health check)."
  type        = number
}

variable "deregistration_delay" {
  description = "Seconds a deregistering target keeps its connections."
  type        = number
}

variable "deletion_protection" {
  description = "Deletion protection of the load balancer."
  type        = bool
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
}
