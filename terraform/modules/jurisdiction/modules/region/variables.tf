variable "jurisdiction" {
  description = "Jurisdiction name, e.g. \"eu\". Used in every resource name."
  type        = string

  validation {
    condition     = can(regex("^[a-z][a-z0-9]{1,15}$", var.jurisdiction))
    error_message = "jurisdiction must be 2-16 lowercase letters or digits, starting with a letter."
  }
}

variable "jurisdiction_regions" {
  description = "Every region of the jurisdiction. The provider's region must be one of them; replication targets must be others of them."
  type        = list(string)
}

variable "bucket_suffix" {
  description = "Optional suffix appended to the bucket name for global uniqueness, e.g. \"-acme\"."
  type        = string
  default     = ""
}

variable "replicate_to" {
  description = "Peer regions of the same jurisdiction to replicate snapshots to: region => { bucket_name, kms_key_arn } (the outputs of this module in that region)."
  type = map(object({
    bucket_name = string
    kms_key_arn = string
  }))
  default = {}
}

variable "object_lock_days" {
  description = "Default Object Lock retention (GOVERNANCE mode) for snapshot objects, in days."
  type        = number
  default     = 30
}

variable "noncurrent_version_days" {
  description = "Days after which noncurrent snapshot versions expire (Object Lock still protects them until their retention ends)."
  type        = number
  default     = 90
}

variable "kms_deletion_window_days" {
  description = "Waiting period before the KMS key is deleted after a destroy."
  type        = number
  default     = 30
}

variable "tags" {
  description = "Tags added to every resource."
  type        = map(string)
  default     = {}
}
