# Alarms: flush lag (from the relays' own gauge, scraped by the CloudWatch
# agent) and unhealthy or missing nodes (from the load balancer).

resource "aws_cloudwatch_metric_alarm" "flush_lag" {
  alarm_name          = "${local.name}-flush-lag"
  alarm_description   = "Oldest change not yet Durable in cell ${var.cell_id} is older than ${var.flush_lag_alarm_seconds}s: DynamoDB/S3 writes are failing or throttled."
  namespace           = "Meridian"
  metric_name         = var.flush_lag_metric_name
  dimensions          = { CellId = var.cell_id }
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 5
  datapoints_to_alarm = 5
  threshold           = var.flush_lag_alarm_seconds
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "missing"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags
}

resource "aws_cloudwatch_metric_alarm" "unhealthy_nodes" {
  alarm_name          = "${local.name}-unhealthy-nodes"
  alarm_description   = "At least one relay node of cell ${var.cell_id} fails its /healthz check."
  namespace           = "AWS/NetworkELB"
  metric_name         = "UnHealthyHostCount"
  statistic           = "Maximum"
  period              = 60
  evaluation_periods  = 3
  threshold           = 0
  comparison_operator = "GreaterThanThreshold"
  treat_missing_data  = "notBreaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags

  dimensions = {
    LoadBalancer = module.lb.arn_suffix
    TargetGroup  = module.lb.target_group_arn_suffix
  }
}

resource "aws_cloudwatch_metric_alarm" "too_few_nodes" {
  alarm_name          = "${local.name}-too-few-healthy-nodes"
  alarm_description   = "Cell ${var.cell_id} has fewer healthy relay nodes than min_size."
  namespace           = "AWS/NetworkELB"
  metric_name         = "HealthyHostCount"
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 3
  threshold           = var.min_size
  comparison_operator = "LessThanThreshold"
  treat_missing_data  = "breaching"
  alarm_actions       = var.alarm_actions
  ok_actions          = var.alarm_actions
  tags                = local.tags

  dimensions = {
    LoadBalancer = module.lb.arn_suffix
    TargetGroup  = module.lb.target_group_arn_suffix
  }
}
