//! [`CloudProvider`] over the EC2 Query API: `POST /` with a form-encoded
//! `Action=...&Version=2016-11-15`, signed with `SigV4`, XML answers.

use std::{
    net::Ipv4Addr,
    sync::{Arc, Mutex, PoisonError},
    time::{Duration, SystemTime},
};

use super::{
    credentials::CredentialChain,
    http::Client,
    imds::Imds,
    sigv4::{self, uri_encode},
    xml::{self, Element},
    ApiCalls, CloudError, CloudProvider, DetachedEni, EniInfo, InstanceIdentity, InstanceLimits,
    SlotKind, SubnetInfo, CREATED_TAG, IPV6_PREFIX_LEN, MANAGED_TAG,
};
use crate::net::Cidr;

/// The API version this client speaks.
pub const API_VERSION: &str = "2016-11-15";
/// Time limit of one HTTP request.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Tag naming the instance an interface was created for.
pub const INSTANCE_TAG: &str = "podnet.io/instance-id";
/// Description of the interfaces podnet creates.
const DESCRIPTION: &str = "podnet pod addresses";
/// Attempts to delete a detached interface while AWS still reports it in use.
const DELETE_ATTEMPTS: u32 = 10;

/// EC2 through the Query API, identity and credentials through IMDS.
#[derive(Debug)]
pub struct Ec2 {
    endpoint: Option<String>,
    http: Client,
    imds: Arc<Imds>,
    credentials: CredentialChain,
    region: Mutex<Option<String>>,
    calls: ApiCalls,
}

impl Ec2 {
    /// A client of `endpoint` (`None`: the region's, [`super::partition`])
    /// with metadata from `imds_endpoint`, counting calls in `calls`.
    pub fn new(
        endpoint: Option<&str>,
        imds_endpoint: &str,
        calls: ApiCalls,
    ) -> Result<Self, CloudError> {
        let http = Client::new(REQUEST_TIMEOUT).map_err(|message| CloudError::Transport {
            action: "setup".into(),
            message,
        })?;
        let imds = Arc::new(Imds::new(imds_endpoint, http.clone()));
        Ok(Self {
            endpoint: endpoint.map(|e| e.trim_end_matches('/').to_owned()),
            credentials: CredentialChain::new(imds.clone(), http.clone(), calls.clone()),
            http,
            imds,
            region: Mutex::new(None),
            calls,
        })
    }

    fn region(&self) -> Result<String, CloudError> {
        let mut region = self.region.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(r) = region.as_ref() {
            return Ok(r.clone());
        }
        let r = self.imds.get("placement/region")?;
        *region = Some(r.clone());
        Ok(r)
    }

    /// One API call; counted whatever its outcome.
    pub fn call(&self, action: &str, params: &[(String, String)]) -> Result<Element, CloudError> {
        let result = self.call_uncounted(action, params);
        let label = match &result {
            Ok(_) => "success",
            Err(e) => e.result_label(),
        };
        self.calls.record(action, label);
        result
    }

    fn call_uncounted(
        &self,
        action: &str,
        params: &[(String, String)],
    ) -> Result<Element, CloudError> {
        let region = self.region()?;
        let url = self
            .endpoint
            .clone()
            .unwrap_or_else(|| super::partition::endpoint("ec2", &region));
        let host = url
            .split_once("://")
            .map_or(url.as_str(), |(_, rest)| rest)
            .split('/')
            .next()
            .unwrap_or_default()
            .to_owned();
        let mut body = format!("Action={}&Version={API_VERSION}", uri_encode(action));
        for (k, v) in params {
            body.push('&');
            body.push_str(&uri_encode(k));
            body.push('=');
            body.push_str(&uri_encode(v));
        }
        let creds = self.credentials.get(&region)?;
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let (amz_date, _) = sigv4::amz_dates(SystemTime::now());
        let mut headers = sigv4::sign(
            &sigv4::Request {
                method: "POST",
                host: &host,
                path: "/",
                query: "",
                headers: &[("content-type", content_type)],
                payload: body.as_bytes(),
            },
            &creds,
            &region,
            "ec2",
            &amz_date,
        );
        headers.push(("content-type".into(), content_type.into()));
        let answer = self
            .http
            .send("POST", &format!("{url}/"), &headers, Some(&body))
            .map_err(|message| CloudError::Transport {
                action: action.into(),
                message,
            })?;
        let doc = xml::parse(&answer.body);
        if answer.status == 200 {
            return doc.map_err(|message| CloudError::Decode {
                action: action.into(),
                message,
            });
        }
        let (code, message) = doc
            .ok()
            .and_then(|root| {
                let mut errors = Vec::new();
                root.find_all("Error", &mut errors);
                errors.first().map(|e| {
                    (
                        e.text_at("Code").unwrap_or_default().to_owned(),
                        e.text_at("Message").unwrap_or_default().to_owned(),
                    )
                })
            })
            .unwrap_or_else(|| (format!("HTTP{}", answer.status), first_line(&answer.body)));
        Err(CloudError::Api {
            action: action.into(),
            code,
            message,
        })
    }
}

fn first_line(s: &str) -> String {
    s.lines()
        .next()
        .unwrap_or_default()
        .chars()
        .take(200)
        .collect()
}

fn decode(action: &str, message: impl Into<String>) -> CloudError {
    CloudError::Decode {
        action: action.into(),
        message: message.into(),
    }
}

/// The request parameter that asks for `kind` slots by count.
fn count_param(kind: SlotKind) -> &'static str {
    match kind {
        SlotKind::Address => "SecondaryPrivateIpAddressCount",
        SlotKind::Prefix => "Ipv4PrefixCount",
    }
}

fn p(k: impl Into<String>, v: impl Into<String>) -> (String, String) {
    (k.into(), v.into())
}

/// The non-empty text at `path` of interface `id`'s item, or an error naming
/// the field.
fn required<'a>(item: &'a Element, id: &str, path: &str) -> Result<&'a str, String> {
    item.text_at(path)
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{id}: no {path}"))
}

/// Reads one `networkInterfaceSet` item. A field podnet relies on that is
/// absent or malformed is an error naming it, never a default.
pub fn parse_eni(item: &Element) -> Result<EniInfo, String> {
    parse_interface(item, None)
}

/// Reads an interface's description; its slot (device index, attachment id)
/// is `slot` when given, else the item's `attachment`.
fn parse_interface(item: &Element, slot: Option<(u32, &str)>) -> Result<EniInfo, String> {
    let id = required(item, "interface", "networkInterfaceId")?.to_owned();
    let mac = required(item, &id, "macAddress")?
        .parse()
        .map_err(|e| format!("{id}: macAddress: {e}"))?;
    let primary_ip: Ipv4Addr = required(item, &id, "privateIpAddress")?
        .parse()
        .map_err(|e| format!("{id}: privateIpAddress: {e}"))?;
    let mut secondary_ips = Vec::new();
    for a in item.items("privateIpAddressesSet") {
        let ip = a
            .text_at("privateIpAddress")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                format!("{id}: no privateIpAddress in an item of privateIpAddressesSet")
            })?;
        let ip: Ipv4Addr = ip
            .parse()
            .map_err(|e| format!("{id}: privateIpAddressesSet: {ip}: {e}"))?;
        if a.text_at("primary") != Some("true") && ip != primary_ip {
            secondary_ips.push(ip);
        }
    }
    secondary_ips.sort_unstable();
    secondary_ips.dedup();
    let mut prefixes = item
        .items("ipv4PrefixSet")
        .map(|a| parse_prefix(&id, "ipv4PrefixSet", a))
        .collect::<Result<Vec<_>, _>>()?;
    prefixes.sort_unstable();
    prefixes.dedup();
    let mut ipv6_prefixes = item
        .items("ipv6PrefixSet")
        .map(|a| {
            let text = a
                .text_at("ipv6Prefix")
                .filter(|t| !t.is_empty())
                .ok_or_else(|| format!("{id}: no ipv6Prefix in an item of ipv6PrefixSet"))?;
            parse_ipv6_prefix(text).map_err(|m| format!("{id}: ipv6PrefixSet: {m}"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    ipv6_prefixes.sort_unstable();
    ipv6_prefixes.dedup();
    // Listed by `attachment.instance-id`, every interface is attached: an
    // answer without its slot or attachment is not one podnet can act on.
    let (device_index, attachment_id) = match slot {
        Some((index, attachment)) => (index, attachment.to_owned()),
        None => (
            required(item, &id, "attachment/deviceIndex")?
                .parse::<u32>()
                .map_err(|e| format!("{id}: attachment/deviceIndex: {e}"))?,
            required(item, &id, "attachment/attachmentId")?.to_owned(),
        ),
    };
    let subnet_id = required(item, &id, "subnetId")?.to_owned();
    let security_groups = item
        .items("groupSet")
        .map(|g| {
            g.text_at("groupId")
                .filter(|t| !t.is_empty())
                .map(str::to_owned)
                .ok_or_else(|| format!("{id}: no groupId in an item of groupSet"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let managed = item
        .items("tagSet")
        .any(|t| t.text_at("key") == Some(MANAGED_TAG) && t.text_at("value") == Some("true"));
    Ok(EniInfo {
        id,
        mac,
        device_index,
        attachment_id,
        subnet_id,
        security_groups,
        primary_ip,
        secondary_ips,
        prefixes,
        ipv6_prefixes,
        managed,
    })
}

/// Reads an IPv6 prefix of [`IPV6_PREFIX_LEN`] bits.
fn parse_ipv6_prefix(text: &str) -> Result<Cidr, String> {
    let prefix: Cidr = text.parse().map_err(|e| format!("{text}: {e}"))?;
    if prefix.network_v4().is_some() || prefix.prefix_len() != IPV6_PREFIX_LEN {
        return Err(format!("{text} is not an IPv6 /{IPV6_PREFIX_LEN} prefix"));
    }
    Ok(prefix)
}

/// Reads the `ipv4Prefix` of an item of `set`: an IPv4 prefix of
/// [`SlotKind::PREFIX_LEN`] bits, as delegated prefixes are.
fn parse_prefix(id: &str, set: &str, item: &Element) -> Result<Cidr, String> {
    let text = item
        .text_at("ipv4Prefix")
        .filter(|t| !t.is_empty())
        .ok_or_else(|| format!("{id}: no ipv4Prefix in an item of {set}"))?;
    let prefix: Cidr = text
        .parse()
        .map_err(|e| format!("{id}: {set}: {text}: {e}"))?;
    if prefix.network_v4().is_none() || prefix.prefix_len() != SlotKind::PREFIX_LEN {
        return Err(format!(
            "{id}: {set}: {text} is not an IPv4 /{} prefix",
            SlotKind::PREFIX_LEN
        ));
    }
    Ok(prefix)
}

impl CloudProvider for Ec2 {
    fn identity(&self) -> Result<InstanceIdentity, CloudError> {
        let id = self.imds.identity()?;
        *self.region.lock().unwrap_or_else(PoisonError::into_inner) = Some(id.region.clone());
        Ok(id)
    }

    fn limits(&self, instance_type: &str) -> Result<InstanceLimits, CloudError> {
        let action = "DescribeInstanceTypes";
        let root = self.call(action, &[p("InstanceType.1", instance_type)])?;
        let item = root
            .items("instanceTypeSet")
            .next()
            .ok_or_else(|| decode(action, format!("unknown instance type {instance_type}")))?;
        let num = |path: &str| {
            item.text_at(path)
                .and_then(|v| v.parse::<u32>().ok())
                .filter(|n| *n > 0)
                .ok_or_else(|| decode(action, format!("{instance_type}: no {path}")))
        };
        Ok(InstanceLimits {
            max_enis: num("networkInfo/maximumNetworkInterfaces")?,
            ips_per_eni: num("networkInfo/ipv4AddressesPerInterface")?,
        })
    }

    fn list_enis(&self, instance_id: &str) -> Result<Vec<EniInfo>, CloudError> {
        let action = "DescribeNetworkInterfaces";
        let root = self.call(
            action,
            &[
                p("Filter.1.Name", "attachment.instance-id"),
                p("Filter.1.Value.1", instance_id),
            ],
        )?;
        let mut enis = root
            .items("networkInterfaceSet")
            .map(parse_eni)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|m| decode(action, m))?;
        enis.sort_by_key(|e| e.device_index);
        Ok(enis)
    }

    fn create_and_attach_eni(
        &self,
        instance_id: &str,
        subnet_id: &str,
        security_groups: &[String],
        device_index: u32,
        kind: SlotKind,
        slots: u32,
    ) -> Result<EniInfo, CloudError> {
        let action = "CreateNetworkInterface";
        let mut params = vec![
            p("SubnetId", subnet_id),
            p("Description", DESCRIPTION),
            p("TagSpecification.1.ResourceType", "network-interface"),
            p("TagSpecification.1.Tag.1.Key", MANAGED_TAG),
            p("TagSpecification.1.Tag.1.Value", "true"),
            p("TagSpecification.1.Tag.2.Key", INSTANCE_TAG),
            p("TagSpecification.1.Tag.2.Value", instance_id),
            p("TagSpecification.1.Tag.3.Key", CREATED_TAG),
            p(
                "TagSpecification.1.Tag.3.Value",
                crate::sys::unix_now_s().to_string(),
            ),
        ];
        for (i, sg) in security_groups.iter().enumerate() {
            params.push(p(format!("SecurityGroupId.{}", i + 1), sg.clone()));
        }
        if slots > 0 {
            params.push(p(count_param(kind), slots.to_string()));
        }
        let root = self.call(action, &params)?;
        let eni_id = root
            .text_at("networkInterface/networkInterfaceId")
            .ok_or_else(|| decode(action, "no networkInterfaceId"))?
            .to_owned();
        let attached = self.call(
            "AttachNetworkInterface",
            &[
                p("NetworkInterfaceId", eni_id.clone()),
                p("InstanceId", instance_id),
                p("DeviceIndex", device_index.to_string()),
            ],
        );
        let attached = match attached {
            Ok(answer) => answer,
            Err(e) => {
                // Do not leave an unattached interface behind.
                if let Err(d) = self.call(
                    "DeleteNetworkInterface",
                    &[p("NetworkInterfaceId", eni_id.clone())],
                ) {
                    tracing::warn!(eni = %eni_id, error = %d, "deleting an interface that failed to attach failed");
                }
                return Err(e);
            }
        };
        let attachment_id = attached
            .text_at("attachmentId")
            .filter(|t| !t.is_empty())
            .ok_or_else(|| decode("AttachNetworkInterface", "no attachmentId"))?;
        let interface = root
            .child("networkInterface")
            .ok_or_else(|| decode(action, "no networkInterface"))?;
        let mut eni = parse_interface(interface, Some((device_index, attachment_id)))
            .map_err(|m| decode(action, m))?;
        // Created with podnet's tag, whether or not the answer repeats it.
        eni.managed = true;
        Ok(eni)
    }

    fn assign(
        &self,
        eni_id: &str,
        kind: SlotKind,
        count: u32,
    ) -> Result<Vec<Ipv4Addr>, CloudError> {
        let action = "AssignPrivateIpAddresses";
        let root = self.call(
            action,
            &[
                p("NetworkInterfaceId", eni_id),
                p(count_param(kind), count.to_string()),
            ],
        )?;
        match kind {
            SlotKind::Address => root
                .items("assignedPrivateIpAddressesSet")
                .map(|a| {
                    let text = a.text_at("privateIpAddress").unwrap_or_default();
                    text.parse::<Ipv4Addr>().map_err(|e| {
                        decode(
                            action,
                            format!("assignedPrivateIpAddressesSet: {text:?}: {e}"),
                        )
                    })
                })
                .collect(),
            SlotKind::Prefix => root
                .items("assignedIpv4PrefixSet")
                .map(|a| {
                    parse_prefix(eni_id, "assignedIpv4PrefixSet", a)
                        .map(|p| p.network_v4().unwrap_or(Ipv4Addr::UNSPECIFIED))
                        .map_err(|m| decode(action, m))
                })
                .collect(),
        }
    }

    fn unassign(&self, eni_id: &str, kind: SlotKind, slots: &[Ipv4Addr]) -> Result<(), CloudError> {
        let mut params = vec![p("NetworkInterfaceId", eni_id)];
        for (i, slot) in slots.iter().enumerate() {
            params.push(match kind {
                SlotKind::Address => p(format!("PrivateIpAddress.{}", i + 1), slot.to_string()),
                SlotKind::Prefix => p(
                    format!("Ipv4Prefix.{}", i + 1),
                    format!("{slot}/{}", SlotKind::PREFIX_LEN),
                ),
            });
        }
        self.call("UnassignPrivateIpAddresses", &params).map(drop)
    }

    fn assign_ipv6_prefix(&self, eni_id: &str) -> Result<Cidr, CloudError> {
        let action = "AssignIpv6Addresses";
        let root = self.call(
            action,
            &[p("NetworkInterfaceId", eni_id), p("Ipv6PrefixCount", "1")],
        )?;
        let text = root
            .items("assignedIpv6PrefixSet")
            .next()
            .map(|e| e.text.trim())
            .filter(|t| !t.is_empty())
            .ok_or_else(|| decode(action, "no assignedIpv6PrefixSet item"))?;
        parse_ipv6_prefix(text).map_err(|m| decode(action, format!("assignedIpv6PrefixSet: {m}")))
    }

    fn list_detached_enis(&self, instance_id: &str) -> Result<Vec<DetachedEni>, CloudError> {
        let action = "DescribeNetworkInterfaces";
        let root = self.call(
            action,
            &[
                p("Filter.1.Name", format!("tag:{INSTANCE_TAG}")),
                p("Filter.1.Value.1", instance_id),
            ],
        )?;
        let mut detached = Vec::new();
        for item in root.items("networkInterfaceSet") {
            let id =
                required(item, "interface", "networkInterfaceId").map_err(|m| decode(action, m))?;
            let tag = |key: &str| {
                item.items("tagSet")
                    .find(|t| t.text_at("key") == Some(key))
                    .and_then(|t| t.text_at("value"))
            };
            // Only podnet's own, and only those attached nowhere.
            if tag(MANAGED_TAG) != Some("true") || item.text_at("status") != Some("available") {
                continue;
            }
            detached.push(DetachedEni {
                id: id.to_owned(),
                created_unix_s: tag(CREATED_TAG).and_then(|v| v.parse().ok()),
            });
        }
        Ok(detached)
    }

    fn describe_subnet(&self, subnet_id: &str) -> Result<SubnetInfo, CloudError> {
        let action = "DescribeSubnets";
        let root = self.call(action, &[p("SubnetId.1", subnet_id)])?;
        let item = root
            .items("subnetSet")
            .next()
            .ok_or_else(|| decode(action, format!("{subnet_id}: not in the answer")))?;
        let cidr = item
            .text_at("cidrBlock")
            .and_then(|c| c.parse::<crate::net::Cidr>().ok())
            .filter(|c| c.network_v4().is_some())
            .ok_or_else(|| decode(action, format!("{subnet_id}: no IPv4 cidrBlock")))?;
        let free = item
            .text_at("availableIpAddressCount")
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| decode(action, format!("{subnet_id}: no availableIpAddressCount")))?;
        Ok(SubnetInfo { cidr, free })
    }

    fn delete_eni(&self, eni_id: &str) -> Result<(), CloudError> {
        self.call("DeleteNetworkInterface", &[p("NetworkInterfaceId", eni_id)])
            .map(drop)
    }

    fn detach_and_delete_eni(&self, eni_id: &str, attachment_id: &str) -> Result<(), CloudError> {
        self.call(
            "DetachNetworkInterface",
            &[p("AttachmentId", attachment_id)],
        )?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.call("DeleteNetworkInterface", &[p("NetworkInterfaceId", eni_id)]) {
                Err(CloudError::Api { code, .. })
                    if code == "InvalidNetworkInterface.InUse" && attempt < DELETE_ATTEMPTS =>
                {
                    // Detaching takes a few seconds on EC2.
                    std::thread::sleep(Duration::from_secs(1));
                }
                other => return other.map(drop),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `DescribeNetworkInterfaces` answer as EC2 gives it.
    const ANSWER: &str = r#"<DescribeNetworkInterfacesResponse xmlns="http://ec2.amazonaws.com/doc/2016-11-15/">
 <networkInterfaceSet><item>
  <networkInterfaceId>eni-1</networkInterfaceId><subnetId>subnet-1</subnetId>
  <macAddress>02:00:00:00:01:01</macAddress><privateIpAddress>10.0.1.5</privateIpAddress>
  <groupSet><item><groupId>sg-1</groupId><groupName>x</groupName></item></groupSet>
  <attachment><attachmentId>eni-attach-1</attachmentId><deviceIndex>1</deviceIndex></attachment>
  <tagSet><item><key>podnet.io/managed</key><value>true</value></item></tagSet>
  <privateIpAddressesSet>
   <item><privateIpAddress>10.0.1.5</privateIpAddress><primary>true</primary></item>
   <item><privateIpAddress>10.0.1.9</privateIpAddress><primary>false</primary></item>
   <item><privateIpAddress>10.0.1.7</privateIpAddress><primary>false</primary></item>
  </privateIpAddressesSet>
  <ipv4PrefixSet>
   <item><ipv4Prefix>10.0.1.48/28</ipv4Prefix></item>
   <item><ipv4Prefix>10.0.1.32/28</ipv4Prefix></item>
  </ipv4PrefixSet>
 </item></networkInterfaceSet></DescribeNetworkInterfacesResponse>"#;

    /// [`parse_eni`] of [`ANSWER`] with `from` replaced by `to`.
    fn parse_changed(from: &str, to: &str) -> Result<EniInfo, String> {
        assert!(ANSWER.contains(from), "{from}");
        let root = xml::parse(&ANSWER.replacen(from, to, 1)).unwrap();
        let eni = parse_eni(root.items("networkInterfaceSet").next().unwrap());
        eni
    }

    #[test]
    fn a_missing_or_malformed_field_is_an_error_naming_it() {
        for (from, to, error) in [
            (
                "<deviceIndex>1</deviceIndex>",
                "",
                "eni-1: no attachment/deviceIndex",
            ),
            (
                "<deviceIndex>1</deviceIndex>",
                "<deviceIndex></deviceIndex>",
                "eni-1: no attachment/deviceIndex",
            ),
            (
                "<deviceIndex>1</deviceIndex>",
                "<deviceIndex>4294967396</deviceIndex>",
                "eni-1: attachment/deviceIndex: number too large to fit in target type",
            ),
            (
                "<deviceIndex>1</deviceIndex>",
                "<deviceIndex>-1</deviceIndex>",
                "eni-1: attachment/deviceIndex: invalid digit found in string",
            ),
            (
                "<attachmentId>eni-attach-1</attachmentId>",
                "",
                "eni-1: no attachment/attachmentId",
            ),
            (
                "<attachment><attachmentId>eni-attach-1</attachmentId><deviceIndex>1</deviceIndex></attachment>",
                "",
                "eni-1: no attachment/deviceIndex",
            ),
            ("<subnetId>subnet-1</subnetId>", "", "eni-1: no subnetId"),
            (
                "<groupId>sg-1</groupId>",
                "",
                "eni-1: no groupId in an item of groupSet",
            ),
            (
                "<networkInterfaceId>eni-1</networkInterfaceId>",
                "",
                "interface: no networkInterfaceId",
            ),
            (
                "<macAddress>02:00:00:00:01:01</macAddress>",
                "",
                "eni-1: no macAddress",
            ),
            (
                // The first one is the interface's own.
                "<privateIpAddress>10.0.1.5</privateIpAddress>",
                "<privateIpAddress>10.0.1</privateIpAddress>",
                "eni-1: privateIpAddress: invalid IPv4 address syntax",
            ),
            (
                "<item><privateIpAddress>10.0.1.9</privateIpAddress>",
                "<item>",
                "eni-1: no privateIpAddress in an item of privateIpAddressesSet",
            ),
            (
                "<privateIpAddress>10.0.1.9</privateIpAddress>",
                "<privateIpAddress>10.0.1.999</privateIpAddress>",
                "eni-1: privateIpAddressesSet: 10.0.1.999: invalid IPv4 address syntax",
            ),
            (
                "<ipv4Prefix>10.0.1.48/28</ipv4Prefix>",
                "",
                "eni-1: no ipv4Prefix in an item of ipv4PrefixSet",
            ),
            (
                "<ipv4Prefix>10.0.1.48/28</ipv4Prefix>",
                "<ipv4Prefix>10.0.1.48/24</ipv4Prefix>",
                "eni-1: ipv4PrefixSet: 10.0.1.48/24: \"10.0.1.48/24\" has host bits set; did you mean 10.0.1.0/24?",
            ),
            (
                "<ipv4Prefix>10.0.1.48/28</ipv4Prefix>",
                "<ipv4Prefix>10.0.1.0/24</ipv4Prefix>",
                "eni-1: ipv4PrefixSet: 10.0.1.0/24 is not an IPv4 /28 prefix",
            ),
        ] {
            assert_eq!(parse_changed(from, to), Err(error.to_owned()), "{from} -> {to:?}");
        }
    }

    #[test]
    fn every_device_index_ec2_can_report_is_kept_as_is() {
        let eni = parse_changed(
            "<deviceIndex>1</deviceIndex>",
            "<deviceIndex>4294967295</deviceIndex>",
        )
        .unwrap();
        assert_eq!(eni.device_index, u32::MAX);
    }

    #[test]
    fn parses_a_network_interface() {
        let root = xml::parse(ANSWER).unwrap();
        let eni = parse_eni(root.items("networkInterfaceSet").next().unwrap()).unwrap();
        assert_eq!(eni.id, "eni-1");
        assert_eq!(eni.device_index, 1);
        assert_eq!(eni.attachment_id, "eni-attach-1");
        assert_eq!(eni.subnet_id, "subnet-1");
        assert_eq!(eni.security_groups, ["sg-1"]);
        assert_eq!(eni.primary_ip.to_string(), "10.0.1.5");
        assert_eq!(
            eni.secondary_ips,
            [
                "10.0.1.7".parse::<Ipv4Addr>().unwrap(),
                "10.0.1.9".parse().unwrap()
            ]
        );
        assert_eq!(
            eni.prefixes,
            [
                "10.0.1.32/28".parse::<Cidr>().unwrap(),
                "10.0.1.48/28".parse().unwrap()
            ]
        );
        assert_eq!(
            SlotKind::Prefix.slots(&eni),
            [Ipv4Addr::new(10, 0, 1, 32), Ipv4Addr::new(10, 0, 1, 48)]
        );
        assert_eq!(
            SlotKind::Prefix
                .addresses(Ipv4Addr::new(10, 0, 1, 40))
                .map(|ip| ip.octets()[3])
                .collect::<Vec<_>>(),
            (32..48).collect::<Vec<u8>>()
        );
        assert!(eni.managed);
    }
}
