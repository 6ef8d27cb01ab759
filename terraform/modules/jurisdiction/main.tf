# The jurisdiction's DynamoDB tables: the change log (a global table whose
# replicas are exactly the jurisdiction's regions) and the control-plane table.
# Per-region KMS keys and snapshot buckets come from ./modules/region, called
# once per region with that region's provider.

data "aws_region" "current" {}

locals {
  primary_region    = var.regions[0]
  replica_regions   = slice(var.regions, 1, length(var.regions))
  change_table_name = "meridian-changes-${var.jurisdiction}"
  control_table     = "meridian-control"
  tags = merge(var.tags, {
    "meridian:jurisdiction" = var.jurisdiction
  })
}

resource "aws_dynamodb_table" "changes" {
  name                        = local.change_table_name
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  stream_enabled              = true
  stream_view_type            = "NEW_AND_OLD_IMAGES"
  deletion_protection_enabled = var.deletion_protection
  tags                        = local.tags

  attribute {
    name = "pk"
    type = "S"
  }

  attribute {
    name = "sk"
    type = "S"
  }

  ttl {
    attribute_name = "expires_at"
    enabled        = true
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.kms_key_arns[local.primary_region]
  }

  dynamic "replica" {
    for_each = local.replica_regions

    content {
      region_name            = replica.value
      kms_key_arn            = var.kms_key_arns[replica.value]
      point_in_time_recovery = true
      propagate_tags         = true
    }
  }

  lifecycle {
    precondition {
      condition     = data.aws_region.current.name == local.primary_region
      error_message = "The provider's region must be the first of var.regions (the primary)."
    }
    precondition {
      condition     = alltrue([for r in var.regions : contains(keys(var.kms_key_arns), r)])
      error_message = "kms_key_arns needs a key for every region of the jurisdiction."
    }
  }
}

resource "aws_dynamodb_table" "control" {
  count = var.control_table_enabled ? 1 : 0

  name                        = local.control_table
  billing_mode                = "PAY_PER_REQUEST"
  hash_key                    = "pk"
  range_key                   = "sk"
  stream_enabled              = true
  stream_view_type            = "NEW_AND_OLD_IMAGES"
  deletion_protection_enabled = var.deletion_protection
  tags                        = local.tags

  attribute {
    name = "pk"
    type = "S"
  }

  attribute {
    name = "sk"
    type = "S"
  }

  point_in_time_recovery {
    enabled = true
  }

  server_side_encryption {
    enabled     = true
    kms_key_arn = var.kms_key_arns[local.primary_region]
  }

  dynamic "replica" {
    for_each = local.replica_regions

    content {
      region_name            = replica.value
      kms_key_arn            = var.kms_key_arns[replica.value]
      point_in_time_recovery = true
      propagate_tags         = true
    }
  }

  lifecycle {
    precondition {
      condition     = data.aws_region.current.name == local.primary_region
      error_message = "The provider's region must be the first of var.regions (the primary)."
    }
  }
}
