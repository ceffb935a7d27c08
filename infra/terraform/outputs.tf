output "bucket_name" {
  description = "Artifact / checkpoint bucket (s3://BUCKET/...)."
  value       = aws_s3_bucket.artifacts.bucket
}

output "bucket_arn" {
  value = aws_s3_bucket.artifacts.arn
}

output "artifacts_kms_key_arn" {
  description = "KMS key the bucket encrypts with."
  value       = aws_kms_key.artifacts.arn
}

output "ray_role_arn" {
  value = aws_iam_role.ray_node.arn
}

output "ray_instance_profile_arn" {
  description = "RLR_DIST_INSTANCE_PROFILE_ARN for cluster/aws.yaml."
  value       = aws_iam_instance_profile.ray_node.arn
}

output "ray_nodes_security_group_id" {
  description = "RLR_DIST_SECURITY_GROUP_ID for cluster/aws.yaml."
  value       = aws_security_group.ray_nodes.id
}

output "mlflow_tracking_uri" {
  description = "MLFLOW_TRACKING_URI for jobs (reachable from the Ray nodes' security group)."
  value       = "http://${aws_lb.mlflow.dns_name}"
}

output "mlflow_artifact_location" {
  value = "s3://${aws_s3_bucket.artifacts.bucket}/mlflow"
}

output "mlflow_db_endpoint" {
  value = aws_db_instance.mlflow.endpoint
}

output "mlflow_db_secret_arn" {
  description = "Secrets Manager secret (managed by RDS) holding the database credentials."
  value       = aws_db_instance.mlflow.master_user_secret[0].secret_arn
}

output "cluster_env" {
  description = "Shell exports for `python -m cluster.validate render cluster/aws.yaml` and for jobs: eval \"$(terraform output -raw cluster_env)\"."
  value = join("\n", [
    "export AWS_REGION=${var.region}",
    "export RLR_DIST_INSTANCE_PROFILE_ARN=${aws_iam_instance_profile.ray_node.arn}",
    "export RLR_DIST_SUBNET_ID=${var.subnet_ids[0]}",
    "export RLR_DIST_SECURITY_GROUP_ID=${aws_security_group.ray_nodes.id}",
    "export RLR_DIST_BUCKET=${aws_s3_bucket.artifacts.bucket}",
    "export MLFLOW_TRACKING_URI=http://${aws_lb.mlflow.dns_name}",
    "",
  ])
}
