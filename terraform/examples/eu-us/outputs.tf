output "router_endpoint" {
  description = "Name clients resolve to reach the nearest healthy router (QUIC, UDP 4433)."
  value       = module.edge.record_name
}

output "cells" {
  description = "Per cell, the values of its relay config keys (see terraform/README.md)."
  value = {
    for cell in [module.cell_eu_a, module.cell_eu_b, module.cell_us_a] : cell.cell_id => {
      "node.cell"         = cell.cell_id
      "node.region"       = cell.region
      "node.jurisdiction" = cell.jurisdiction
      "node.listen"       = cell.quic_listen
      "node.data_dir"     = cell.data_dir
      "durable.table"     = cell.durable_table
      "durable.bucket"    = cell.durable_bucket
      "durable.region"    = cell.region
      "gossip.listen"     = cell.gossip_listen
      "metrics.listen"    = cell.metrics_listen
      gossip_key_secret   = cell.gossip_key_secret_arn
      load_balancer       = cell.nlb_dns_name
      gateway_url         = cell.gateway_url
      autoscaling_group   = cell.autoscaling_group_name
    }
  }
}

output "change_tables" {
  description = "Change table and its regions per jurisdiction."
  value = {
    eu = { table = module.eu.change_table_name, regions = module.eu.regions }
    us = { table = module.us.change_table_name, regions = module.us.regions }
  }
}

output "snapshot_buckets" {
  description = "Snapshot bucket per jurisdiction and region."
  value = {
    eu = {
      "eu-west-1"    = module.eu_storage_eu_west_1.bucket_name
      "eu-central-1" = module.eu_storage_eu_central_1.bucket_name
    }
    us = {
      "us-east-1" = module.us_storage_us_east_1.bucket_name
    }
  }
}

output "relay_configs" {
  description = "Rendered relay.toml per cell (placeholders filled at boot)."
  value = {
    for cell in [module.cell_eu_a, module.cell_eu_b, module.cell_us_a] : cell.cell_id => cell.relay_config
  }
}
