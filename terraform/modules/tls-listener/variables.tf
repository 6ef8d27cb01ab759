variable "name_prefix" {
  description = "name_prefix of the target group (at most 6 characters)."
  type        = string

  validation {
    condition     = length(var.name_prefix) <= 6
    error_message = "A target group's name_prefix has at most 6 characters."
  }
}

variable "what" {
  description = "What the listener serves, for rule descriptions (e.g. \"wss:// to the WebSocket gateways\")."
  type        = string
}

variable "vpc_id" {
  description = "VPC of the targets."
  type        = string
}

variable "load_balancer_arn" {
  description = "The Network Load Balancer to add the listener to (quic-lb output arn)."
  type        = string
}

variable "load_balancer_security_group_id" {
  description = "Security group of the load balancer (quic-lb output security_group_id)."
  type        = string
}

variable "target_security_group_id" {
  description = "Security group of the targets."
  type        = string
}

variable "client_cidrs" {
  description = "CIDRs that may reach the TLS port."
  type        = list(string)
}

variable "tls_port" {
  description = "TCP port of the TLS listener."
  type        = number
}

variable "target_port" {
  description = "TCP port of the targets' plain listener that TLS is forwarded to."
  type        = number
}

variable "certificate_arn" {
  description = "ACM certificate of the TLS listener."
  type        = string
}

variable "health_port" {
  description = "TCP port of the targets' /readyz (their metrics port)."
  type        = number
}

variable "deregistration_delay" {
  description = "Seconds a deregistering target keeps its connections."
  type        = number
}

variable "tags" {
  description = "Tags of every resource."
  type        = map(string)
}
