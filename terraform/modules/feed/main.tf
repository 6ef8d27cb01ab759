# The change feed (`meridian feed`) of one jurisdiction in one of its regions: one
# instance in an autoscaling group that reads the change table's stream in this region
# and delivers to the tenants' webhooks. Deploy it in every region of the jurisdiction:
# the lease in the table lets one of them deliver at a time, and another takes over
# within lease_ms when it stops.

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
  name       = "meridian-feed-${var.jurisdiction}"
  table_arn  = "arn:${local.partition}:dynamodb:${local.region}:${local.account_id}:table/${var.durable_table}"
  tags = merge(var.tags, {
    "meridian:feed" = var.jurisdiction
  })

  feed_config = templatefile("${path.module}/templates/feed.toml.tftpl", {
    feed_id          = var.feed_id
    jurisdiction     = var.jurisdiction
    lease_ms         = var.lease_ms
    poll_interval_ms = var.poll_interval_ms
    durable_table    = var.durable_table
    durable_bucket   = var.durable_bucket
    region           = local.region
    metrics_port     = var.metrics_port
    control_table    = var.control_table
    control_region   = var.control_region
    webhooks         = var.webhooks
  })

  # The boot script is shared with the cell module; it writes each webhook's secret
  # to the file feed.toml names.
  user_data = templatefile("${path.module}/../cell/templates/user-data.sh.tftpl", {
    service            = "feed"
    region             = local.region
    cell_id            = ""
    data_dir           = "/var/lib/meridian"
    data_volume        = "none"
    quic_port          = 0
    gossip_port        = 0
    metrics_port       = var.metrics_port
    binary_url         = var.meridian_binary_url
    binary_sha256      = var.meridian_binary_sha256
    gossip_secret_arn  = ""
    tls_secret_arn     = ""
    advertise_public   = false
    discover_seeds     = false
    config_b64         = base64encode(local.feed_config)
    cwagent_config_b64 = ""
    secret_files       = { for w in var.webhooks : "/etc/meridian/webhooks/${w.tenant}.secrets" => w.secret_arn }
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

resource "aws_iam_role" "feed" {
  name_prefix        = "${local.name}-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "feed" {
  name_prefix = "${local.name}-"
  role        = aws_iam_role.feed.name
  tags        = local.tags
}

data "aws_iam_policy_document" "feed" {
  statement {
    sid       = "ChangeStream"
    actions   = ["dynamodb:DescribeStream", "dynamodb:GetRecords", "dynamodb:GetShardIterator"]
    resources = ["${local.table_arn}/stream/*"]
  }

  statement {
    sid       = "ListStreams"
    actions   = ["dynamodb:ListStreams"]
    resources = ["*"]
  }

  # Reads changes (items, the write-time index for replays and catch-ups, the tenant's
  # documents); writes only its own items: the lease, checkpoints, announced purges and
  # dead letters (partitions starting with "#feed" and "#dead-letter#").
  statement {
    sid       = "ChangeTableRead"
    actions   = ["dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:Query", "dynamodb:Scan"]
    resources = [local.table_arn, "${local.table_arn}/index/*"]
  }

  statement {
    sid       = "FeedItems"
    actions   = ["dynamodb:PutItem", "dynamodb:DeleteItem"]
    resources = [local.table_arn]

    condition {
      test     = "ForAllValues:StringLike"
      variable = "dynamodb:LeadingKeys"
      values   = ["#feed*", "#dead-letter#*"]
    }
  }

  statement {
    sid       = "ControlTable"
    actions   = ["dynamodb:DescribeTable", "dynamodb:GetItem", "dynamodb:Query"]
    resources = ["arn:${local.partition}:dynamodb:${var.control_region}:${local.account_id}:table/${var.control_table}"]
  }

  # Changes too large for an item are objects of the region's bucket.
  statement {
    sid       = "LargeChanges"
    actions   = ["s3:GetObject"]
    resources = ["arn:${local.partition}:s3:::${var.durable_bucket}/*"]
  }

  statement {
    sid       = "JurisdictionKey"
    actions   = ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    resources = compact([var.kms_key_arn, var.control_kms_key_arn])
  }

  dynamic "statement" {
    for_each = length(var.webhooks) == 0 ? [] : [1]

    content {
      sid       = "WebhookSecrets"
      actions   = ["secretsmanager:GetSecretValue"]
      resources = distinct([for w in var.webhooks : w.secret_arn])
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

resource "aws_iam_role_policy" "feed" {
  name   = "meridian-feed"
  role   = aws_iam_role.feed.id
  policy = data.aws_iam_policy_document.feed.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count = var.enable_ssm ? 1 : 0

  role       = aws_iam_role.feed.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}

# --- Network ------------------------------------------------------------------------

resource "aws_security_group" "feed" {
  name_prefix = "${local.name}-"
  description = "Meridian feed ${var.jurisdiction}"
  vpc_id      = var.vpc_id
  tags        = merge(local.tags, { Name = local.name })

  lifecycle {
    create_before_destroy = true
  }
}

resource "aws_vpc_security_group_ingress_rule" "metrics" {
  security_group_id = aws_security_group.feed.id
  description       = "Prometheus metrics from the monitoring network"
  ip_protocol       = "tcp"
  from_port         = var.metrics_port
  to_port           = var.metrics_port
  cidr_ipv4         = var.metrics_cidr
}

# AWS APIs, the binary, and the webhooks (which the feed checks itself: no loopback,
# private, link-local or metadata addresses unless a webhook allows private ones).
resource "aws_vpc_security_group_egress_rule" "webhooks" {
  for_each = toset([for port in var.webhook_ports : tostring(port)])

  security_group_id = aws_security_group.feed.id
  description       = "HTTPS to AWS APIs and webhooks on port ${each.value}"
  ip_protocol       = "tcp"
  from_port         = tonumber(each.value)
  to_port           = tonumber(each.value)
  cidr_ipv4         = "0.0.0.0/0"
}

# --- Compute ------------------------------------------------------------------------

resource "aws_launch_template" "feed" {
  name_prefix   = "${local.name}-"
  description   = "Meridian feed ${var.jurisdiction}"
  image_id      = data.aws_ssm_parameter.ami.value
  instance_type = var.instance_type
  ebs_optimized = true
  user_data     = base64encode(local.user_data)
  tags          = local.tags

  update_default_version = true

  iam_instance_profile {
    arn = aws_iam_instance_profile.feed.arn
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
    associate_public_ip_address = false
    delete_on_termination       = true
    security_groups             = [aws_security_group.feed.id]
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

# One instance: the lease makes a second one in this region wait, so capacity comes
# from the other regions' feeds, not from more instances here.
resource "aws_autoscaling_group" "feed" {
  name_prefix               = "${local.name}-"
  min_size                  = 1
  max_size                  = 1
  desired_capacity          = 1
  vpc_zone_identifier       = var.subnet_ids
  health_check_type         = "EC2"
  health_check_grace_period = 90
  wait_for_capacity_timeout = "15m"

  launch_template {
    id      = aws_launch_template.feed.id
    version = aws_launch_template.feed.latest_version
  }

  instance_refresh {
    strategy = "Rolling"

    preferences {
      min_healthy_percentage = 0
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

  depends_on = [aws_iam_role_policy.feed]
}
