# Instance role: only this cell's jurisdiction table (in this region), the
# region's snapshot bucket and KMS key, the gossip key and the metrics log group.

data "aws_iam_policy_document" "assume" {
  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["ec2.amazonaws.com"]
    }
  }
}

resource "aws_iam_role" "node" {
  name_prefix        = "${local.name}-node-"
  assume_role_policy = data.aws_iam_policy_document.assume.json
  tags               = local.tags
}

resource "aws_iam_instance_profile" "node" {
  name_prefix = "${local.name}-node-"
  role        = aws_iam_role.node.name
  tags        = local.tags
}

data "aws_iam_policy_document" "node" {
  statement {
    sid = "ChangeTable"
    actions = [
      "dynamodb:BatchGetItem",
      "dynamodb:BatchWriteItem",
      "dynamodb:ConditionCheckItem",
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      # The second sweep of a tenant purge lists the tenant's documents.
      "dynamodb:Scan",
    ]
    resources = ["arn:${local.partition}:dynamodb:${local.region}:${local.account_id}:table/${var.durable_table}"]
  }

  statement {
    sid = "ControlTable"
    actions = [
      "dynamodb:ConditionCheckItem",
      "dynamodb:DescribeTable",
      "dynamodb:GetItem",
      "dynamodb:PutItem",
      "dynamodb:Query",
      "dynamodb:UpdateItem",
    ]
    resources = ["arn:${local.partition}:dynamodb:${local.region}:${local.account_id}:table/${var.control_table}"]
  }

  statement {
    sid       = "SnapshotBucket"
    actions   = ["s3:ListBucket", "s3:GetBucketLocation", "s3:GetBucketVersioning"]
    resources = ["arn:${local.partition}:s3:::${var.durable_bucket}"]
  }

  # DeleteObject without a version id only adds a delete marker: the locked
  # version stays until its retention ends and the lifecycle rule expires it.
  # The role has no s3:DeleteObjectVersion and no s3:BypassGovernanceRetention.
  statement {
    sid       = "SnapshotObjects"
    actions   = ["s3:GetObject", "s3:PutObject", "s3:DeleteObject"]
    resources = ["arn:${local.partition}:s3:::${var.durable_bucket}/*"]
  }

  statement {
    sid       = "JurisdictionKey"
    actions   = ["kms:Decrypt", "kms:DescribeKey", "kms:Encrypt", "kms:GenerateDataKey"]
    resources = [var.kms_key_arn]
  }

  statement {
    sid       = "Secrets"
    actions   = ["secretsmanager:GetSecretValue"]
    resources = compact([aws_secretsmanager_secret.gossip.arn, var.tls_secret_arn])
  }

  statement {
    sid       = "MetricsLogs"
    actions   = ["logs:CreateLogStream", "logs:DescribeLogStreams", "logs:PutLogEvents"]
    resources = ["${aws_cloudwatch_log_group.prometheus.arn}:*"]
  }

  dynamic "statement" {
    for_each = length(var.gossip_seeds) == 0 ? [1] : []

    content {
      sid = "SeedDiscovery"
      # DescribeInstances supports no resource-level restriction.
      actions   = ["ec2:DescribeInstances"]
      resources = ["*"]
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

resource "aws_iam_role_policy" "node" {
  name   = "meridian-relay"
  role   = aws_iam_role.node.id
  policy = data.aws_iam_policy_document.node.json
}

resource "aws_iam_role_policy_attachment" "ssm" {
  count = var.enable_ssm ? 1 : 0

  role       = aws_iam_role.node.name
  policy_arn = "arn:${local.partition}:iam::aws:policy/AmazonSSMManagedInstanceCore"
}
