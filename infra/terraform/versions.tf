terraform {
  required_version = ">= 1.5.0"

  required_providers {
    aws = {
      source  = "hashicorp/aws"
      version = ">= 5.40, < 6.0"
    }
  }

  # State: configure a remote backend (S3 + DynamoDB lock, or HCP Terraform) in a
  # backend.tf that is not committed, or pass -backend-config at `terraform init`.
}
