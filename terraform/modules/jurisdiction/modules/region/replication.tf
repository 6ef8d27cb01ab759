# Snapshot replication to the other regions of the same jurisdiction, and to
# nowhere else. The destinations come from var.replicate_to (the outputs of this
# module in the peer regions); the bucket's preconditions and
# terraform/tests/residency.py both refuse a destination outside the
# jurisdiction.

locals {
  replicate    = length(var.replicate_to) > 0
  peer_regions = sort(keys(var.replicate_to))
}

data "aws_iam_policy_document" "replication_assume" {
  count = local.replicate ? 1 : 0

  statement {
    actions = ["sts:AssumeRole"]

    principals {
      type        = "Service"
      identifiers = ["s3.amazonaws.com"]
    }

    condition {
      test     = "StringEquals"
      variable = "aws:SourceAccount"
      values   = [local.account_id]
    }
  }
}

resource "aws_iam_role" "replication" {
  count = local.replicate ? 1 : 0

  name               = "meridian-s3-replication-${var.jurisdiction}-${local.region}"
  assume_role_policy = data.aws_iam_policy_document.replication_assume[0].json
  tags               = local.tags
}

data "aws_iam_policy_document" "replication" {
  count = local.replicate ? 1 : 0

  statement {
    sid       = "ReadSourceConfiguration"
    actions   = ["s3:GetReplicationConfiguration", "s3:ListBucket"]
    resources = [aws_s3_bucket.snapshots.arn]
  }

  statement {
    sid = "ReadSourceObjects"
    actions = [
      "s3:GetObjectVersionForReplication",
      "s3:GetObjectVersionAcl",
      "s3:GetObjectVersionTagging",
      "s3:GetObjectRetention",
      "s3:GetObjectLegalHold",
    ]
    resources = ["${aws_s3_bucket.snapshots.arn}/*"]
  }

  statement {
    sid = "WriteReplicasInJurisdiction"
    actions = [
      "s3:ReplicateObject",
      "s3:ReplicateDelete",
      "s3:ReplicateTags",
      "s3:ObjectOwnerOverrideToBucketOwner",
    ]
    resources = [for r in local.peer_regions : "arn:${local.partition}:s3:::${var.replicate_to[r].bucket_name}/*"]
  }

  statement {
    sid       = "DecryptSource"
    actions   = ["kms:Decrypt"]
    resources = [aws_kms_key.this.arn]
  }

  statement {
    sid       = "EncryptReplicas"
    actions   = ["kms:Encrypt", "kms:GenerateDataKey"]
    resources = [for r in local.peer_regions : var.replicate_to[r].kms_key_arn]
  }
}

resource "aws_iam_role_policy" "replication" {
  count = local.replicate ? 1 : 0

  name   = "replicate-within-${var.jurisdiction}"
  role   = aws_iam_role.replication[0].id
  policy = data.aws_iam_policy_document.replication[0].json
}

resource "aws_s3_bucket_replication_configuration" "snapshots" {
  count = local.replicate ? 1 : 0

  role   = aws_iam_role.replication[0].arn
  bucket = aws_s3_bucket.snapshots.id

  dynamic "rule" {
    for_each = var.replicate_to

    content {
      id       = "to-${rule.key}"
      priority = index(local.peer_regions, rule.key) + 1
      status   = "Enabled"

      filter {}

      delete_marker_replication {
        status = "Enabled"
      }

      source_selection_criteria {
        sse_kms_encrypted_objects {
          status = "Enabled"
        }
        replica_modifications {
          status = "Enabled"
        }
      }

      destination {
        bucket        = "arn:${local.partition}:s3:::${rule.value.bucket_name}"
        storage_class = "STANDARD"

        encryption_configuration {
          replica_kms_key_id = rule.value.kms_key_arn
        }
      }
    }
  }

  lifecycle {
    precondition {
      condition     = alltrue([for r in keys(var.replicate_to) : contains(var.jurisdiction_regions, r) && r != local.region])
      error_message = "Residency: snapshots may only replicate to other regions of the same jurisdiction."
    }
  }

  depends_on = [
    aws_s3_bucket_versioning.snapshots,
    aws_s3_bucket_object_lock_configuration.snapshots,
  ]
}
