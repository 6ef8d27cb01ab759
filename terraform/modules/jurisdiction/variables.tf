variable "jurisdiction" {
  description = "Jurisdiction name, e.g. \"eu\". The change table is meridian-changes-<jurisdiction>."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,15}$", var.jurisdiction))
    error_message = "jurisdiction must be 2-16 lowercase letters or digits, starting with a letter."
  }
}

variable "regions" {
  description = "The jurisdiction's regions. The first is the primary (the provider's region); the change table gets a replica in each of the others, and in no other region."
  type        = list(string)

  validation {
    condition     = length(var.regions) > 0 && length(distinct(var.regions)) == length(var.regions)
    error_message = "regions must be a non-empty list without duplicates."
  }
}

variable "kms_key_arns" {
  description = "Customer-managed KMS key ARN per region (region => key ARN), one for every region in var.regions: the outputs kms_key_arn of modules/jurisdiction/modules/region."
  type        = map(string)
}

variable "control_table_enabled" {
  description = "Create the control-plane table meridian-control (tenant placements and the cell directory of this jurisdiction), replicated over the same regions."
  type        = bool
  default     = true
}

variable "deletion_protection" {
  description = "Turn on DynamoDB deletion protection on both tables. Set to false (and apply) before a destroy."
  type        = bool
  default     = true
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
