//! The AWS SDK's shared configuration, the same for every process (the durable tier, the
//! control plane).

use std::time::Duration;

/// The AWS SDK's shared config for `region`: the default credential chain (emulator
/// credentials when `emulator` and none are in the environment), a 3 s connect timeout,
/// `attempt_timeout` per attempt and three times that per call.
pub async fn sdk_config(
    region: &str,
    emulator: bool,
    attempt_timeout: Duration,
) -> aws_config::SdkConfig {
    let mut loader = aws_config::defaults(aws_config::BehaviorVersion::latest())
        .region(aws_config::Region::new(region.to_owned()));
    if emulator && std::env::var_os("AWS_ACCESS_KEY_ID").is_none() {
        loader = loader.credentials_provider(aws_sdk_dynamodb::config::Credentials::new(
            "emulator",
            "emulator",
            None,
            None,
            "meridian-emulator",
        ));
    }
    loader
        .timeout_config(
            aws_config::timeout::TimeoutConfig::builder()
                .connect_timeout(Duration::from_secs(3))
                .operation_attempt_timeout(attempt_timeout)
                .operation_timeout(attempt_timeout * 3)
                .build(),
        )
        .load()
        .await
}
