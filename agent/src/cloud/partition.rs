//! AWS partitions: which domain a region's service endpoints live under.

/// `https://<service>.<region>.<domain>`: `amazonaws.com.cn` in the China
/// regions (`cn-...`), `amazonaws.com` elsewhere (`aws-us-gov` included).
pub fn endpoint(service: &str, region: &str) -> String {
    let domain = if region.starts_with("cn-") {
        "amazonaws.com.cn"
    } else {
        "amazonaws.com"
    };
    format!("https://{service}.{region}.{domain}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_partition_has_its_domain() {
        assert_eq!(
            endpoint("ec2", "us-east-1"),
            "https://ec2.us-east-1.amazonaws.com"
        );
        assert_eq!(
            endpoint("sts", "cn-north-1"),
            "https://sts.cn-north-1.amazonaws.com.cn"
        );
        assert_eq!(
            endpoint("ec2", "us-gov-west-1"),
            "https://ec2.us-gov-west-1.amazonaws.com"
        );
    }
}
