terraform {
  required_version = ">= 1.11.0" # write-only secret_string_wo (gossip key never in state)

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100.0, < 7.0.0"
    }
  }
}
