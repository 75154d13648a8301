//! Kernel struct offsets resolved from the running kernel's BTF.
//!
//! Rust eBPF programs have no CO-RE field relocations, so the kernel programs
//! read `sk_buff`, `nf_conn` and friends at offsets that this module resolves at
//! load time and hands over as globals. Nothing here hard-codes a kernel layout:
//! the same binary reads 6.1, 6.12 and 6.18 kernels correctly.

use std::path::{Path, PathBuf};

use btf_rs::{Btf, Type};
use podnet_common::conntrack::KernelOffsets;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
/// Directory of per-module (split) BTF files.
pub const MODULE_BTF_DIR: &str = "/sys/kernel/btf";

/// Errors resolving kernel types.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    /// The BTF file could not be read or parsed.
    #[error(
        "reading kernel BTF {path}: {message} (is the kernel built with CONFIG_DEBUG_INFO_BTF?)"
    )]
    Read {
        /// File that failed.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// A type is missing from every BTF source searched.
    #[error("kernel BTF has no {kind} `{name}`")]
    MissingType {
        /// `struct`, `enum`, ...
        kind: &'static str,
        /// Type name.
        name: String,
    },
    /// A member path does not exist in a struct.
    #[error("kernel BTF: `{ty}` has no member `{member}`")]
    MissingMember {
        /// Struct name.
        ty: String,
        /// Member path, dot-separated.
        member: String,
    },
    /// An enum has no such enumerator.
    #[error("kernel BTF: enum `{ty}` has no value `{name}`")]
    MissingEnumValue {
        /// Enum name.
        ty: String,
        /// Enumerator name.
        name: String,
    },
}

/// The kernel's BTF: vmlinux plus, where conntrack is a module, its split BTF.
pub struct KernelBtf {
    sources: Vec<Btf>,
}

impl KernelBtf {
    /// Loads vmlinux BTF and the split BTF of the modules whose types podnet reads
    /// (`nf_conntrack`, `nf_nat`) when they are modules on this kernel.
    pub fn load() -> Result<Self, BtfError> {
        Self::load_from(Path::new(VMLINUX_BTF), Path::new(MODULE_BTF_DIR))
    }

    /// Loads from explicit locations (tests, other kernels' BTF).
    pub fn load_from(vmlinux: &Path, module_dir: &Path) -> Result<Self, BtfError> {
        let read_err = |path: &Path, e: &dyn std::fmt::Display| BtfError::Read {
            path: path.to_owned(),
            message: e.to_string(),
        };
        let base = Btf::from_file(vmlinux).map_err(|e| read_err(vmlinux, &e))?;
        let mut sources = Vec::new();
        for module in ["nf_conntrack", "nf_nat"] {
            let path = module_dir.join(module);
            if path.exists() {
                let split = Btf::from_split_file(&path, &base).map_err(|e| read_err(&path, &e))?;
                sources.push(split);
            }
        }
        sources.insert(0, base);
        Ok(Self { sources })
    }

    fn find(&self, name: &str, want_struct: bool) -> Option<(&Btf, Type)> {
        for btf in &self.sources {
            let Ok(types) = btf.resolve_types_by_name(name) else {
                continue;
            };
            for ty in types {
                let matches = if want_struct {
                    matches!(ty, Type::Struct(_) | Type::Union(_))
                } else {
                    matches!(ty, Type::Enum(_) | Type::Enum64(_))
                };
                if matches {
                    return Some((btf, ty));
                }
            }
        }
        None
    }

    /// Byte offset of a dot-separated member path inside `struct ty`, looking
    /// through anonymous structs and unions (`sk_buff._nfct` lives in one).
    pub fn offset_of(&self, ty: &str, path: &str) -> Result<u32, BtfError> {
        let (btf, mut current) = self.find(ty, true).ok_or_else(|| BtfError::MissingType {
            kind: "struct",
            name: ty.to_owned(),
        })?;
        let missing = || BtfError::MissingMember {
            ty: ty.to_owned(),
            member: path.to_owned(),
        };
        let mut total_bits = 0u32;
        for part in path.split('.') {
            let (bits, member_ty) = find_member(btf, &current, part).ok_or_else(missing)?;
            total_bits += bits;
            current = member_ty;
        }
        if !total_bits.is_multiple_of(8) {
            return Err(missing());
        }
        Ok(total_bits / 8)
    }

    /// Size in bytes of `struct ty`.
    pub fn size_of(&self, ty: &str) -> Result<u32, BtfError> {
        match self.find(ty, true) {
            Some((_, Type::Struct(s) | Type::Union(s))) => {
                u32::try_from(s.size()).map_err(|_| BtfError::MissingType {
                    kind: "sized struct",
                    name: ty.to_owned(),
                })
            }
            _ => Err(BtfError::MissingType {
                kind: "struct",
                name: ty.to_owned(),
            }),
        }
    }

    /// Value of enumerator `name` in `enum ty`.
    pub fn enum_value(&self, ty: &str, name: &str) -> Result<u64, BtfError> {
        let (btf, found) = self.find(ty, false).ok_or_else(|| BtfError::MissingType {
            kind: "enum",
            name: ty.to_owned(),
        })?;
        let value = match &found {
            Type::Enum(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == name))
                .map(|m| u64::from(m.val())),
            Type::Enum64(e) => e
                .members
                .iter()
                .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == name))
                .map(btf_rs::Enum64Member::val),
            _ => None,
        };
        value.ok_or_else(|| BtfError::MissingEnumValue {
            ty: ty.to_owned(),
            name: name.to_owned(),
        })
    }

    /// Every enumerator of `enum skb_drop_reason`, by value, with the
    /// `SKB_DROP_REASON_` prefix taken off (`NETFILTER_DROP`, `NO_SOCKET`,
    /// ...): the names and values differ between kernels, so they are read
    /// from the running kernel.
    pub fn drop_reason_names(&self) -> Result<std::collections::HashMap<u32, String>, BtfError> {
        const TYPE: &str = "skb_drop_reason";
        let (btf, found) = self
            .find(TYPE, false)
            .ok_or_else(|| BtfError::MissingType {
                kind: "enum",
                name: TYPE.to_owned(),
            })?;
        let entry = |name: Result<String, _>, value: u64| {
            let name: String = name.ok()?;
            let short = name.strip_prefix("SKB_DROP_REASON_").unwrap_or(&name);
            Some((u32::try_from(value).ok()?, short.to_owned()))
        };
        let names = match &found {
            Type::Enum(e) => e
                .members
                .iter()
                .filter_map(|m| entry(btf.resolve_name(m), u64::from(m.val())))
                .collect(),
            Type::Enum64(e) => e
                .members
                .iter()
                .filter_map(|m| entry(btf.resolve_name(m), m.val()))
                .collect(),
            _ => std::collections::HashMap::new(),
        };
        Ok(names)
    }

    /// Resolves every offset the conntrack tracer needs. `netns_filter`,
    /// `event_budget_per_cpu` and `race_hook` are left for the caller.
    pub fn conntrack_offsets(&self) -> Result<KernelOffsets, BtfError> {
        let hash_tuple = self.offset_of("nf_conntrack_tuple_hash", "tuple")?;
        let reason = self.enum_value("skb_drop_reason", "SKB_DROP_REASON_NETFILTER_DROP")?;
        Ok(KernelOffsets {
            skb_nfct: self.offset_of("sk_buff", "_nfct")?,
            skb_head: self.offset_of("sk_buff", "head")?,
            skb_network_header: self.offset_of("sk_buff", "network_header")?,
            skb_dev: self.offset_of("sk_buff", "dev")?,
            dev_nd_net: self.offset_of("net_device", "nd_net.net")?,
            net_ns_inum: self.offset_of("net", "ns.inum")?,
            ct_status: self.offset_of("nf_conn", "status")?,
            ct_net: self.offset_of("nf_conn", "ct_net.net")?,
            ct_tuplehash: self.offset_of("nf_conn", "tuplehash")?,
            tuplehash_size: self.size_of("nf_conntrack_tuple_hash")?,
            tuplehash_tuple: hash_tuple,
            tuple_src_addr: self.offset_of("nf_conntrack_tuple", "src.u3")?,
            tuple_src_port: self.offset_of("nf_conntrack_tuple", "src.u")?,
            tuple_src_l3num: self.offset_of("nf_conntrack_tuple", "src.l3num")?,
            tuple_dst_addr: self.offset_of("nf_conntrack_tuple", "dst.u3")?,
            tuple_dst_port: self.offset_of("nf_conntrack_tuple", "dst.u")?,
            tuple_dst_protonum: self.offset_of("nf_conntrack_tuple", "dst.protonum")?,
            drop_reason_netfilter: u32::try_from(reason).map_err(|_| {
                BtfError::MissingEnumValue {
                    ty: "skb_drop_reason".into(),
                    name: "SKB_DROP_REASON_NETFILTER_DROP (fits u32)".into(),
                }
            })?,
            netns_filter: 0,
            event_budget_per_cpu: 0,
            race_hook: 0,
            skb_protocol: self.offset_of("sk_buff", "protocol")?,
            // Set by the tracer from its configuration.
            flow_ports: [0; podnet_common::conntrack::FLOW_PORTS],
        })
    }
}

/// Follows typedefs and qualifiers to the struct or union underneath.
fn strip(btf: &Btf, mut ty: Type) -> Option<Type> {
    for _ in 0..16 {
        match ty {
            Type::Typedef(_)
            | Type::Volatile(_)
            | Type::Const(_)
            | Type::Restrict(_)
            | Type::TypeTag(_) => {
                let inner = ty.as_btf_type()?;
                ty = btf.resolve_chained_type(inner).ok()?;
            }
            _ => return Some(ty),
        }
    }
    None
}

/// Finds `name` among `ty`'s members, descending into anonymous members.
/// Returns the member's bit offset from the start of `ty` and its type.
fn find_member(btf: &Btf, ty: &Type, name: &str) -> Option<(u32, Type)> {
    let (Type::Struct(s) | Type::Union(s)) = strip(btf, ty.clone())? else {
        return None;
    };
    for member in &s.members {
        let member_name = btf.resolve_name(member).unwrap_or_default();
        let member_ty = btf.resolve_chained_type(member).ok()?;
        if member_name == name {
            return Some((member.bit_offset(), member_ty));
        }
        if member_name.is_empty() {
            if let Some((inner, found)) = find_member(btf, &member_ty, name) {
                return Some((member.bit_offset() + inner, found));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn kernel() -> Option<KernelBtf> {
        if !Path::new(VMLINUX_BTF).exists() {
            assert!(
                std::env::var("CI").as_deref() != Ok("true"),
                "CI=true but {VMLINUX_BTF} is missing"
            );
            eprintln!("SKIPPED: {VMLINUX_BTF} missing");
            return None;
        }
        Some(KernelBtf::load().expect("vmlinux BTF parses"))
    }

    /// A struct or union of `bpftool btf dump ... format raw`: name, size,
    /// and members as (name, type id, bit offset).
    struct RawType {
        name: String,
        size: u32,
        members: Vec<(String, u32, u32)>,
    }

    /// The running kernel's BTF as bpftool prints it: an oracle independent
    /// of btf-rs and of our resolver.
    fn bpftool_types() -> std::collections::HashMap<u32, RawType> {
        let out = std::process::Command::new("bpftool")
            .args(["btf", "dump", "file", VMLINUX_BTF, "format", "raw"])
            .output()
            .expect("bpftool runs (cargo xtask setup installs it)");
        let text = String::from_utf8(out.stdout).unwrap();
        let mut types = std::collections::HashMap::new();
        let mut current = None;
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix('[') {
                current = None;
                let (id, rest) = rest.split_once("] ").unwrap();
                let mut words = rest.split_whitespace();
                if !matches!(words.next(), Some("STRUCT" | "UNION")) {
                    continue;
                }
                let name = words.next().unwrap().trim_matches('\'').to_owned();
                let size = words
                    .next()
                    .unwrap()
                    .trim_start_matches("size=")
                    .parse()
                    .unwrap();
                let id: u32 = id.parse().unwrap();
                types.insert(
                    id,
                    RawType {
                        name,
                        size,
                        members: Vec::new(),
                    },
                );
                current = Some(id);
            } else if let (Some(id), Some(member)) = (current, line.strip_prefix('\t')) {
                let mut words = member.split_whitespace();
                let name = words.next().unwrap().trim_matches('\'').to_owned();
                let field = |w: Option<&str>, key: &str| -> u32 {
                    w.unwrap().trim_start_matches(key).parse().unwrap()
                };
                let type_id = field(words.next(), "type_id=");
                let bits = field(words.next(), "bits_offset=");
                types
                    .get_mut(&id)
                    .unwrap()
                    .members
                    .push((name, type_id, bits));
            }
        }
        types
    }

    /// Bit offset of `member` in type `id`, through anonymous members.
    fn raw_offset(
        types: &std::collections::HashMap<u32, RawType>,
        id: u32,
        member: &str,
    ) -> Option<u32> {
        types[&id].members.iter().find_map(|(name, type_id, bits)| {
            if name == member {
                Some(*bits)
            } else if name == "(anon)" && types.contains_key(type_id) {
                raw_offset(types, *type_id, member).map(|inner| bits + inner)
            } else {
                None
            }
        })
    }

    #[test]
    fn offsets_match_bpftools_view_of_the_kernel() {
        let Some(btf) = kernel() else { return };
        let types = bpftool_types();
        let struct_id = |name: &str| {
            types
                .iter()
                .find(|(_, t)| t.name == name)
                .map(|(id, _)| *id)
                .unwrap()
        };
        // `_nfct` and `dev` live in anonymous unions/structs of sk_buff.
        for (ty, member) in [
            ("sk_buff", "_nfct"),
            ("sk_buff", "head"),
            ("sk_buff", "dev"),
            ("sk_buff", "network_header"),
            ("nf_conn", "tuplehash"),
            ("nf_conn", "status"),
            ("nf_conn", "ct_net"),
            ("nf_conntrack_tuple_hash", "tuple"),
        ] {
            let bits = raw_offset(&types, struct_id(ty), member).unwrap();
            assert_eq!(
                btf.offset_of(ty, member).unwrap(),
                bits / 8,
                "{ty}.{member}"
            );
        }
        let hash = &types[&struct_id("nf_conntrack_tuple_hash")];
        assert_eq!(btf.size_of("nf_conntrack_tuple_hash").unwrap(), hash.size);
    }

    #[test]
    fn conntrack_offsets_are_consistent() {
        let Some(btf) = kernel() else { return };
        let o = btf.conntrack_offsets().unwrap();
        // Layout facts that hold on every kernel: the tuple hash node precedes
        // the tuple, the source manip precedes the destination, and a tuple
        // hash holds a whole tuple.
        assert!(o.tuplehash_tuple >= 16);
        assert_eq!(o.tuple_src_addr, 0);
        assert_eq!(o.tuple_src_port, 16);
        assert!(o.tuple_dst_addr > o.tuple_src_l3num);
        assert!(o.tuplehash_size > o.tuplehash_tuple + o.tuple_dst_protonum);
        assert!(o.ct_status > o.ct_tuplehash + o.tuplehash_size);
    }

    #[test]
    fn missing_things_are_named() {
        let Some(btf) = kernel() else { return };
        let err = btf.offset_of("sk_buff", "no_such_member").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF: `sk_buff` has no member `no_such_member`"
        );
        let err = btf.size_of("podnet_no_such_struct").unwrap_err();
        assert_eq!(
            err.to_string(),
            "kernel BTF has no struct `podnet_no_such_struct`"
        );
    }
}
