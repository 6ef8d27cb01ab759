# Global entry: one latency-routed alias record per router region, each guarded
# by a health check that follows the router's "no healthy router" alarm, so
# that a client resolving var.record_name gets the nearest region that has a
# healthy router. (Route 53 cannot probe UDP; the NLB probes /healthz of every
# router, and the alarm turns the NLB's healthy host count into this check.)

resource "aws_route53_health_check" "router" {
  for_each = var.routers

  type                            = "CLOUDWATCH_METRIC"
  cloudwatch_alarm_name           = each.value.health_alarm_name
  cloudwatch_alarm_region         = each.value.region
  insufficient_data_health_status = "LastKnownStatus"

  tags = merge(var.tags, {
    Name = "meridian-router-${each.key}"
  })
}

resource "aws_route53_record" "router" {
  for_each = var.routers

  zone_id         = var.zone_id
  name            = var.record_name
  type            = "A"
  set_identifier  = each.key
  health_check_id = aws_route53_health_check.router[each.key].id

  latency_routing_policy {
    region = each.value.region
  }

  alias {
    name                   = each.value.nlb_dns_name
    zone_id                = each.value.nlb_zone_id
    evaluate_target_health = true
  }
}
