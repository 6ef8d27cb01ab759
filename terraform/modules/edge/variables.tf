variable "zone_id" {
  description = "Route 53 hosted zone that holds the entry record."
  type        = string
}

variable "record_name" {
  description = "Fully qualified name clients resolve to reach the nearest healthy router, e.g. \"router.meridian.example.com\"."
  type        = string
}

variable "routers" {
  description = "Router deployments (outputs of modules/router): key => { region, nlb_dns_name, nlb_zone_id, health_alarm_name }."
  type = map(object({
    region            = string
    nlb_dns_name      = string
    nlb_zone_id       = string
    health_alarm_name = string
  }))

  validation {
    condition     = length(var.routers) > 0
    error_message = "At least one router deployment is needed."
  }
}

variable "tags" {
  description = "Tags added to the health checks."
  type        = map(string)
  default     = {}
}
