terraform {
  required_version = ">= 1.11.0" # write-only secret_string_wo (gossip key never in state)

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.100.0, < 7.0.0"
    }
  }

  # Keep state remote and encrypted (it names every resource; secrets are
  # write-only and stay out of it).
  # backend "s3" {
  #   bucket       = "my-terraform-state"
  #   key          = "meridian/eu-us.tfstate"
  #   region       = "eu-west-1"
  #   encrypt      = true
  #   use_lockfile = true
  # }
}
