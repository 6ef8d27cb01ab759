# The router service (`meridian router`) in one region: instances in an
# autoscaling group behind a UDP Network Load Balancer, with a health alarm that
# modules/edge turns into a Route 53 health check.

data "aws_region" "current" {}
data "aws_caller_identity" "current" {}
data "aws_partition" "current" {}

data "aws_ssm_parameter" "ami" {
  name = var.ami_ssm_parameter
}

locals {
  region     = data.aws_region.current.name
  account_id = data.aws_caller_identity.current.account_id
  partition  = data.aws_partition.current.partition
  name       = "meridian-${var.name}"
  tags = merge(var.tags, {
    "meridian:router" = var.name
  })

  router_config = templatefile("${path.module}/templates/router.toml.tftpl", {
    quic_port        = var.quic_port
    metrics_port     = var.metrics_port
    locate_http_port = var.locate_http_port
    locate_origins   = var.locate_origins
    control_tables   = var.control_tables
    jurisdictions    = var.jurisdictions
    cells            = var.cells
  })

  # The boot script is shared with the cell module.
  user_data = templatefile("${path.module}/../cell/templates/user-data.sh.tftpl", {
    service            = "router"
    region             = local.region
    cell_id            = ""
    data_dir           = "/var/lib/meridian"
    data_volume        = "none"
    quic_port          = var.quic_port
    gossip_port        = 0
    metrics_port       = var.metrics_port
    binary_url         = var.meridian_binary_url
    binary_sha256      = var.meridian_binary_sha256
    gossip_secret_arn  = ""
    tls_secret_arn     = coalesce(var.tls_secret_arn, "")
    advertise_public   = var.public_addresses
    discover_seeds     = false
    config_b64         = base64encode(local.router_config)
    cwagent_config_b64 = ""
    secret_files       = {}
  })
}

# --- IAM --------------------------------------------------------------------------

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "router" {
  name_prefix        = "${local.name}-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "router" {
  name_prefix = "${local.name}-"
  role        = aws_iam_role.router.name
  tags        = local.tags
}

data "aws_iam_policy_document" "router" {
  statement {
    sid = "ControlTables"
    actions = [
      "dynamodb:ConditionCheckItem",
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      "dynamodb:Scan",
      "dynamodb:UpdateItem",
    ]
    resources = [for c in values(var.control_tables) : "arn:${local.partition}:dynamodb:${c.region}:${local.account_id}:table/${c.table}"]
  }

  statement {
    sid       = "ControlTableKeys"
    actions   = ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    resources = distinct([for c in values(var.control_tables) : c.kms_key_arn])
  }

  dynamic "statement" {
    for_each = var.tls_secret_arn == null ? [] : [var.tls_secret_arn]

    content {
      sid       = "TlsSecret"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = [statement.value]
    }
  }

  dynamic "statement" {
    for_each = var.binary_bucket_arn == null ? [] : [var.binary_bucket_arn]

    content {
      sid       = "Binary"
      actions   = ["s3:GetObject"]
      resources = ["${statement.value}/*"]
    }
  }
}

resource "aws_iam_role_policy" "router" {
  name   = "meridian-router"
  role   = aws_iam_role.router.id
  policy = data.aws_iam_policy_document.router.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count = var.enable_ssm ? 1 : 0

  role       = aws_iam_role.router.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# --- Network ------------------------------------------------------------------------

resource "aws_security_group" "router" {
  name_prefix = "${local.name}-"
  description = "Meridian router ${var.name}"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "quic" {
  for_each = toset(var.client_cidrs)

  security_group_id = aws_security_group.router.id
  description       = "QUIC from clients"
  ip_protocol       = "udp"
  from_port         = var.quic_port
  to_port           = var.quic_port
  cidr_ipv4         = each.value
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  security_group_id = aws_security_group.router.id
  description       = "Prometheus metrics from the monitoring network"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = var.metrics_cidr
}

resource "aws_vpc_security_group_ingress_rule" "health" {
  security_group_id            = aws_security_group.router.id
  description                  = "NLB health checks on /healthz"
  ip_protocol                  = "tcp"
  from_port                    = var.metrics_port
  to_port                      = var.metrics_port
  referenced_security_group_id = module.lb.security_group_id
}

resource "aws_vpc_security_group_egress_rule" "https" {
  security_group_id = aws_security_group.router.id
  description       = "HTTPS to AWS APIs and the binary"
  ip_protocol       = "tcp"
  from_port         = 443
  to_port           = 443
  cidr_ipv4         = "0.0.0.0/0"
}

resource "aws_vpc_security_group_egress_rule" "cells" {
  security_group_id = aws_security_group.router.id
  description       = "Readiness probes (HTTP GET /readyz) to the cells' load balancers"
  ip_protocol       = "tcp"
  from_port         = var.cell_probe_port
  to_port           = var.cell_probe_port
  cidr_ipv4         = "0.0.0.0/0"
}

# The HTTP locate for browser apps over TLS (https): the load balancer terminates TLS on
# locate_tls_port and forwards to the routers' locate_http_port.
resource "aws_vpc_security_group_ingress_rule" "locate" {
  security_group_id            = aws_security_group.router.id
  description                  = "HTTP locate from the load balancer's TLS listener"
  ip_protocol                  = "tcp"
  from_port                    = var.locate_http_port
  to_port                      = var.locate_http_port
  referenced_security_group_id = module.lb.security_group_id
}

module "locate_tls" {
  source = "../tls-listener"

  name_prefix                     = "mrl-"
  what                            = "https:// locate"
  vpc_id                          = var.vpc_id
  load_balancer_arn               = module.lb.arn
  load_balancer_security_group_id = module.lb.security_group_id
  target_security_group_id        = aws_security_group.router.id
  client_cidrs                    = var.client_cidrs
  tls_port                        = var.locate_tls_port
  target_port                     = var.locate_http_port
  certificate_arn                 = var.locate_certificate_arn
  health_port                     = var.metrics_port
  deregistration_delay            = 30
  tags                            = local.tags
}

# Deployments made before the locate listener moved into modules/tls-listener keep it.
moved {
  from = aws_vpc_security_group_ingress_rule.nlb_locate
  to   = module.locate_tls.aws_vpc_security_group_ingress_rule.clients
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_locate
  to   = module.locate_tls.aws_vpc_security_group_egress_rule.targets
}

moved {
  from = aws_lb_target_group.locate
  to   = module.locate_tls.aws_lb_target_group.this
}

moved {
  from = aws_lb_listener.locate
  to   = module.locate_tls.aws_lb_listener.this
}

module "lb" {
  source = "../quic-lb"

  name                     = local.name
  description              = "Meridian router ${var.name} load balancer"
  role                     = "routers"
  target_group_prefix      = "mrr-"
  vpc_id                   = var.vpc_id
  subnet_ids               = var.subnet_ids
  client_cidrs             = var.client_cidrs
  target_security_group_id = aws_security_group.router.id
  quic_port                = var.quic_port
  metrics_port             = var.metrics_port
  deregistration_delay     = 30
  deletion_protection      = var.deletion_protection
  tags                     = local.tags
}

# The load balancer moved into modules/quic-lb; these keep existing deployments in place.
moved {
  from = aws_security_group.nlb
  to   = module.lb.aws_security_group.nlb
}

moved {
  from = aws_vpc_security_group_ingress_rule.nlb_quic
  to   = module.lb.aws_vpc_security_group_ingress_rule.nlb_quic
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_quic
  to   = module.lb.aws_vpc_security_group_egress_rule.nlb_quic
}

moved {
  from = aws_vpc_security_group_egress_rule.nlb_health
  to   = module.lb.aws_vpc_security_group_egress_rule.nlb_health
}

moved {
  from = aws_lb.this
  to   = module.lb.aws_lb.this
}

moved {
  from = aws_lb_target_group.quic
  to   = module.lb.aws_lb_target_group.quic
}

moved {
  from = aws_lb_listener.quic
  to   = module.lb.aws_lb_listener.quic
}

# --- Compute ------------------------------------------------------------------------

resource "aws_launch_template" "router" {
  name_prefix   = "${local.name}-"
  description   = "Meridian router ${var.name}"
  image_id      = data.aws_ssm_parameter.ami.value
  instance_type = var.instance_type
  ebs_optimized = true
  user_data     = base64encode(local.user_data)
  tags          = local.tags

  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.router.arn
  }

  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
    instance_metadata_tags      = "disabled"
  }

  monitoring {
    enabled = true
  }

  network_interfaces {
    associate_public_ip_address = var.public_addresses
    delete_on_termination       = true
    security_groups             = [aws_security_group.router.id]
  }

  block_device_mappings {
    device_name = "/dev/xvda"

    ebs {
      volume_type           = "gp3"
      volume_size           = 20
      encrypted             = true
      delete_on_termination = true
    }
  }

  tag_specifications {
    resource_type = "instance"
    tags          = merge(local.tags, { Name = local.name })
  }
}

resource "aws_autoscaling_group" "router" {
  name_prefix               = "${local.name}-"
  min_size                  = var.min_size
  max_size                  = var.max_size
  desired_capacity          = var.desired_capacity
  vpc_zone_identifier       = var.subnet_ids
  target_group_arns         = [module.lb.target_group_arn, module.locate_tls.target_group_arn]
  health_check_type         = "ELB"
  health_check_grace_period = 90
  wait_for_capacity_timeout = "15m"

  launch_template {
    id      = aws_launch_template.router.id
    version = aws_launch_template.router.latest_version
  }

  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 50
    }
  }

  dynamic "tag" {
    for_each = local.tags

    content {
      key                 = tag.key
      value               = tag.value
      propagate_at_launch = true
    }
  }

  depends_on = [aws_iam_role_policy.router]
}

# --- Health -------------------------------------------------------------------------

resource "aws_cloudwatch_metric_alarm" "no_healthy_router" {
  alarm_name          = "${local.name}-no-healthy-router"
  alarm_description   = "No healthy router behind ${local.name}; Route 53 stops answering with this region."
  namespace           = "AWS/NetworkELB"
  metric_name         = "HealthyHostCount"
  statistic           = "Minimum"
  period              = 60
  evaluation_periods  = 2
  threshold           = 1
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
