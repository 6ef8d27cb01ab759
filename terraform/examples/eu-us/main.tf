# Meridian in two jurisdictions:
#   eu: cells eu-a (eu-west-1) and eu-b (eu-central-1); change table replicated
#       between the two; snapshots replicated between the two regional buckets.
#   us: cell us-a (us-east-1); no replication (one region).
# Routers in eu-west-1 and us-east-1 behind one latency-routed DNS name.

locals {
  tags = {
    "meridian:deployment" = "eu-us"
  }
}

# --- eu -------------------------------------------------------------------------------

module "eu_storage_eu_west_1" {
  source    = "../../modules/jurisdiction/modules/region"
  providers = { aws = aws.eu_west_1 }

  jurisdiction         = "eu"
  jurisdiction_regions = var.jurisdictions["eu"]
  bucket_suffix        = var.bucket_suffix

  replicate_to = {
    "eu-central-1" = {
      bucket_name = module.eu_storage_eu_central_1.bucket_name
      kms_key_arn = module.eu_storage_eu_central_1.kms_key_arn
    }
  }
}

module "eu_storage_eu_central_1" {
  source    = "../../modules/jurisdiction/modules/region"
  providers = { aws = aws.eu_central_1 }

  jurisdiction         = "eu"
  jurisdiction_regions = var.jurisdictions["eu"]
  bucket_suffix        = var.bucket_suffix

  replicate_to = {
    "eu-west-1" = {
      bucket_name = module.eu_storage_eu_west_1.bucket_name
      kms_key_arn = module.eu_storage_eu_west_1.kms_key_arn
    }
  }
}

module "eu" {
  source    = "../../modules/jurisdiction"
  providers = { aws = aws.eu_west_1 }

  jurisdiction        = "eu"
  regions             = var.jurisdictions["eu"]
  deletion_protection = var.deletion_protection

  kms_key_arns = {
    "eu-west-1"    = module.eu_storage_eu_west_1.kms_key_arn
    "eu-central-1" = module.eu_storage_eu_central_1.kms_key_arn
  }
}

module "cell_eu_a" {
  source    = "../../modules/cell"
  providers = { aws = aws.eu_west_1 }

  cell_id              = "eu-a"
  jurisdiction         = module.eu.jurisdiction
  jurisdiction_regions = var.jurisdictions["eu"]
  durable_table        = module.eu.change_table_name
  durable_bucket       = module.eu_storage_eu_west_1.bucket_name
  kms_key_arn          = module.eu_storage_eu_west_1.kms_key_arn

  vpc_id                  = var.networks["eu-west-1"].vpc_id
  subnet_ids              = var.networks["eu-west-1"].subnet_ids
  metrics_cidr            = var.metrics_cidr
  router_cidrs            = var.router_cidrs
  meridian_binary_url     = var.meridian_binary_url
  meridian_binary_sha256  = var.meridian_binary_sha256
  binary_bucket_arn       = var.binary_bucket_arn
  tls_secret_arn          = lookup(var.tls_secret_arns, "eu-west-1", null)
  gateway_certificate_arn = var.gateway_certificate_arns["eu-west-1"]
  tenants                 = lookup(var.tenants, "eu", [])
  alarm_actions           = lookup(var.alarm_actions, "eu-west-1", [])
  deletion_protection     = var.deletion_protection
}

module "cell_eu_b" {
  source    = "../../modules/cell"
  providers = { aws = aws.eu_central_1 }

  cell_id              = "eu-b"
  jurisdiction         = module.eu.jurisdiction
  jurisdiction_regions = var.jurisdictions["eu"]
  durable_table        = module.eu.change_table_name
  durable_bucket       = module.eu_storage_eu_central_1.bucket_name
  kms_key_arn          = module.eu_storage_eu_central_1.kms_key_arn

  vpc_id                  = var.networks["eu-central-1"].vpc_id
  subnet_ids              = var.networks["eu-central-1"].subnet_ids
  metrics_cidr            = var.metrics_cidr
  router_cidrs            = var.router_cidrs
  meridian_binary_url     = var.meridian_binary_url
  meridian_binary_sha256  = var.meridian_binary_sha256
  binary_bucket_arn       = var.binary_bucket_arn
  tls_secret_arn          = lookup(var.tls_secret_arns, "eu-central-1", null)
  gateway_certificate_arn = var.gateway_certificate_arns["eu-central-1"]
  tenants                 = lookup(var.tenants, "eu", [])
  alarm_actions           = lookup(var.alarm_actions, "eu-central-1", [])
  deletion_protection     = var.deletion_protection
}

# The change feed, in every region of the jurisdiction: one lease, one delivers.
module "feed_eu_west_1" {
  source    = "../../modules/feed"
  providers = { aws = aws.eu_west_1 }

  jurisdiction           = module.eu.jurisdiction
  durable_table          = module.eu.change_table_name
  durable_bucket         = module.eu_storage_eu_west_1.bucket_name
  kms_key_arn            = module.eu_storage_eu_west_1.kms_key_arn
  control_table          = module.eu.control_table_name
  control_region         = module.eu.control_table_region
  control_kms_key_arn    = module.eu_storage_eu_west_1.kms_key_arn
  webhooks               = lookup(var.webhooks, "eu", [])
  vpc_id                 = var.networks["eu-west-1"].vpc_id
  subnet_ids             = var.networks["eu-west-1"].subnet_ids
  metrics_cidr           = var.metrics_cidr
  meridian_binary_url    = var.meridian_binary_url
  meridian_binary_sha256 = var.meridian_binary_sha256
  binary_bucket_arn      = var.binary_bucket_arn
}

# The change feed, in every region of the jurisdiction: one lease, one delivers.
module "feed_eu_central_1" {
  source    = "../../modules/feed"
  providers = { aws = aws.eu_central_1 }

  jurisdiction           = module.eu.jurisdiction
  durable_table          = module.eu.change_table_name
  durable_bucket         = module.eu_storage_eu_central_1.bucket_name
  kms_key_arn            = module.eu_storage_eu_central_1.kms_key_arn
  control_table          = module.eu.control_table_name
  control_region         = module.eu.control_table_region
  control_kms_key_arn    = module.eu_storage_eu_west_1.kms_key_arn
  webhooks               = lookup(var.webhooks, "eu", [])
  vpc_id                 = var.networks["eu-central-1"].vpc_id
  subnet_ids             = var.networks["eu-central-1"].subnet_ids
  metrics_cidr           = var.metrics_cidr
  meridian_binary_url    = var.meridian_binary_url
  meridian_binary_sha256 = var.meridian_binary_sha256
  binary_bucket_arn      = var.binary_bucket_arn
}

# --- us -------------------------------------------------------------------------------

module "us_storage_us_east_1" {
  source    = "../../modules/jurisdiction/modules/region"
  providers = { aws = aws.us_east_1 }

  jurisdiction         = "us"
  jurisdiction_regions = var.jurisdictions["us"]
  bucket_suffix        = var.bucket_suffix
}

module "us" {
  source    = "../../modules/jurisdiction"
  providers = { aws = aws.us_east_1 }

  jurisdiction        = "us"
  regions             = var.jurisdictions["us"]
  deletion_protection = var.deletion_protection

  kms_key_arns = {
    "us-east-1" = module.us_storage_us_east_1.kms_key_arn
  }
}

module "cell_us_a" {
  source    = "../../modules/cell"
  providers = { aws = aws.us_east_1 }

  cell_id              = "us-a"
  jurisdiction         = module.us.jurisdiction
  jurisdiction_regions = var.jurisdictions["us"]
  durable_table        = module.us.change_table_name
  durable_bucket       = module.us_storage_us_east_1.bucket_name
  kms_key_arn          = module.us_storage_us_east_1.kms_key_arn

  vpc_id                  = var.networks["us-east-1"].vpc_id
  subnet_ids              = var.networks["us-east-1"].subnet_ids
  metrics_cidr            = var.metrics_cidr
  router_cidrs            = var.router_cidrs
  meridian_binary_url     = var.meridian_binary_url
  meridian_binary_sha256  = var.meridian_binary_sha256
  binary_bucket_arn       = var.binary_bucket_arn
  tls_secret_arn          = lookup(var.tls_secret_arns, "us-east-1", null)
  gateway_certificate_arn = var.gateway_certificate_arns["us-east-1"]
  tenants                 = lookup(var.tenants, "us", [])
  alarm_actions           = lookup(var.alarm_actions, "us-east-1", [])
  deletion_protection     = var.deletion_protection
}

# The change feed, in every region of the jurisdiction: one lease, one delivers.
module "feed_us_east_1" {
  source    = "../../modules/feed"
  providers = { aws = aws.us_east_1 }

  jurisdiction           = module.us.jurisdiction
  durable_table          = module.us.change_table_name
  durable_bucket         = module.us_storage_us_east_1.bucket_name
  kms_key_arn            = module.us_storage_us_east_1.kms_key_arn
  control_table          = module.us.control_table_name
  control_region         = module.us.control_table_region
  control_kms_key_arn    = module.us_storage_us_east_1.kms_key_arn
  webhooks               = lookup(var.webhooks, "us", [])
  vpc_id                 = var.networks["us-east-1"].vpc_id
  subnet_ids             = var.networks["us-east-1"].subnet_ids
  metrics_cidr           = var.metrics_cidr
  meridian_binary_url    = var.meridian_binary_url
  meridian_binary_sha256 = var.meridian_binary_sha256
  binary_bucket_arn      = var.binary_bucket_arn
}

# --- Routers and global entry ---------------------------------------------------------

locals {
  # The cell directory every router probes and places tenants in.
  router_cells = [
    module.cell_eu_a.router_cell,
    module.cell_eu_b.router_cell,
    module.cell_us_a.router_cell,
  ]

  control_tables = {
    eu = {
      region      = module.eu.control_table_region
      table       = module.eu.control_table_name
      kms_key_arn = module.eu_storage_eu_west_1.kms_key_arn
    }
    us = {
      region      = module.us.control_table_region
      table       = module.us.control_table_name
      kms_key_arn = module.us_storage_us_east_1.kms_key_arn
    }
  }
}

module "router_eu_west_1" {
  source    = "../../modules/router"
  providers = { aws = aws.eu_west_1 }

  name                   = "router-eu-west-1"
  control_tables         = local.control_tables
  jurisdictions          = var.jurisdictions
  cells                  = local.router_cells
  vpc_id                 = var.networks["eu-west-1"].vpc_id
  subnet_ids             = var.networks["eu-west-1"].subnet_ids
  metrics_cidr           = var.metrics_cidr
  meridian_binary_url    = var.meridian_binary_url
  meridian_binary_sha256 = var.meridian_binary_sha256
  binary_bucket_arn      = var.binary_bucket_arn
  tls_secret_arn         = lookup(var.tls_secret_arns, "eu-west-1", null)
  locate_certificate_arn = var.locate_certificate_arns["eu-west-1"]
  locate_origins         = var.locate_origins
  alarm_actions          = lookup(var.alarm_actions, "eu-west-1", [])
  deletion_protection    = var.deletion_protection
}

module "router_us_east_1" {
  source    = "../../modules/router"
  providers = { aws = aws.us_east_1 }

  name                   = "router-us-east-1"
  control_tables         = local.control_tables
  jurisdictions          = var.jurisdictions
  cells                  = local.router_cells
  vpc_id                 = var.networks["us-east-1"].vpc_id
  subnet_ids             = var.networks["us-east-1"].subnet_ids
  metrics_cidr           = var.metrics_cidr
  meridian_binary_url    = var.meridian_binary_url
  meridian_binary_sha256 = var.meridian_binary_sha256
  binary_bucket_arn      = var.binary_bucket_arn
  tls_secret_arn         = lookup(var.tls_secret_arns, "us-east-1", null)
  locate_certificate_arn = var.locate_certificate_arns["us-east-1"]
  locate_origins         = var.locate_origins
  alarm_actions          = lookup(var.alarm_actions, "us-east-1", [])
  deletion_protection    = var.deletion_protection
}

module "edge" {
  source    = "../../modules/edge"
  providers = { aws = aws.us_east_1 }

  zone_id     = var.zone_id
  record_name = var.router_record_name

  routers = {
    "eu-west-1" = {
      region            = module.router_eu_west_1.region
      nlb_dns_name      = module.router_eu_west_1.nlb_dns_name
      nlb_zone_id       = module.router_eu_west_1.nlb_zone_id
      health_alarm_name = module.router_eu_west_1.health_alarm_name
    }
    "us-east-1" = {
      region            = module.router_us_east_1.region
      nlb_dns_name      = module.router_us_east_1.nlb_dns_name
      nlb_zone_id       = module.router_us_east_1.nlb_zone_id
      health_alarm_name = module.router_us_east_1.health_alarm_name
    }
  }
}
