//! Just enough of a BTF reader to find struct field offsets in the running
//! kernel's `/sys/kernel/btf/vmlinux`.
//!
//! aya parses BTF but does not expose struct members, and Rust BPF code
//! cannot use CO-RE relocations, so the loader reads the offsets itself and
//! hands them to the program as a global (`janus_common::Offsets`).

/// What is wrong with the kernel's BTF, for the programs' needs.
#[derive(Debug, thiserror::Error)]
pub enum BtfError {
    #[error("reading {path}: {source}")]
    Read {
        path: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("not little-endian BTF")]
    NotLittleEndian,
    #[error("BTF truncated")]
    Truncated,
    #[error("BTF {0} section out of bounds")]
    Section(&'static str),
    #[error("unknown BTF kind {0}")]
    UnknownKind(u32),
    #[error("BTF type id {0} out of range")]
    TypeId(u32),
    #[error("struct {0} not in BTF")]
    NoStruct(String),
    #[error("struct {0} has no member {1}")]
    NoMember(String, String),
    #[error("{0}.{1} is a bitfield")]
    Bitfield(String, String),
    #[error("{name}.{member} is not {expect:?} (BTF kind {kind})")]
    Kind {
        name: String,
        member: String,
        expect: Expect,
        kind: u32,
    },
}

type Result<T> = std::result::Result<T, BtfError>;

const BTF_MAGIC: u16 = 0xeb9f;

const KIND_INT: u32 = 1;
const KIND_PTR: u32 = 2;
const KIND_ARRAY: u32 = 3;
const KIND_STRUCT: u32 = 4;
const KIND_UNION: u32 = 5;
const KIND_ENUM: u32 = 6;
const KIND_TYPEDEF: u32 = 8;
const KIND_VOLATILE: u32 = 9;
const KIND_CONST: u32 = 10;
const KIND_RESTRICT: u32 = 11;
const KIND_FUNC_PROTO: u32 = 13;
const KIND_VAR: u32 = 14;
const KIND_DATASEC: u32 = 15;
const KIND_DECL_TAG: u32 = 17;
const KIND_TYPE_TAG: u32 = 18;
const KIND_ENUM64: u32 = 19;

#[derive(Clone, Copy, Debug)]
struct Member {
    name_off: u32,
    type_id: u32,
    /// In bits.
    offset: u32,
}

#[derive(Debug)]
struct Type {
    name_off: u32,
    kind: u32,
    /// Size for INT/STRUCT/UNION/ENUM, referenced type for PTR/TYPEDEF/...
    size_or_type: u32,
    members: Vec<Member>,
}

pub struct Btf {
    /// Indexed by type id; id 0 is `void`.
    types: Vec<Type>,
    strings: Vec<u8>,
}

/// What a member is expected to be, to catch a wrong lookup early.
#[derive(Clone, Copy, Debug)]
pub enum Expect {
    Pointer,
    /// An integer of this many bytes.
    Int(u32),
    /// An embedded struct (whose own members are looked up next).
    Struct,
}

fn u16_at(data: &[u8], off: usize) -> Result<u16> {
    let b = data.get(off..off + 2).ok_or(BtfError::Truncated)?;
    Ok(u16::from_le_bytes([b[0], b[1]]))
}

fn u32_at(data: &[u8], off: usize) -> Result<u32> {
    let b = data.get(off..off + 4).ok_or(BtfError::Truncated)?;
    Ok(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

impl Btf {
    /// Parses little-endian (x86_64) BTF.
    pub fn parse(data: &[u8]) -> Result<Self> {
        if u16_at(data, 0)? != BTF_MAGIC {
            return Err(BtfError::NotLittleEndian);
        }
        let hdr_len = u32_at(data, 4)? as usize;
        let type_off = hdr_len + u32_at(data, 8)? as usize;
        let type_len = u32_at(data, 12)? as usize;
        let str_off = hdr_len + u32_at(data, 16)? as usize;
        let str_len = u32_at(data, 20)? as usize;
        let strings = data
            .get(str_off..str_off + str_len)
            .ok_or(BtfError::Section("string"))?
            .to_vec();
        let tdata = data
            .get(type_off..type_off + type_len)
            .ok_or(BtfError::Section("type"))?;

        let mut types = vec![Type {
            name_off: 0,
            kind: 0,
            size_or_type: 0,
            members: Vec::new(),
        }];
        let mut pos = 0;
        while pos < tdata.len() {
            let name_off = u32_at(tdata, pos)?;
            let info = u32_at(tdata, pos + 4)?;
            let size_or_type = u32_at(tdata, pos + 8)?;
            pos += 12;
            let vlen = (info & 0xffff) as usize;
            let kind = (info >> 24) & 0x1f;
            let kind_flag = info >> 31 == 1;
            let mut members = Vec::new();
            match kind {
                KIND_INT | KIND_VAR | KIND_DECL_TAG => pos += 4,
                KIND_ARRAY => pos += 12,
                KIND_STRUCT | KIND_UNION => {
                    for _ in 0..vlen {
                        let raw = u32_at(tdata, pos + 8)?;
                        members.push(Member {
                            name_off: u32_at(tdata, pos)?,
                            type_id: u32_at(tdata, pos + 4)?,
                            // With kind_flag the top 8 bits are a bitfield size.
                            offset: if kind_flag { raw & 0x00ff_ffff } else { raw },
                        });
                        pos += 12;
                    }
                }
                KIND_ENUM | KIND_FUNC_PROTO => pos += 8 * vlen,
                KIND_DATASEC | KIND_ENUM64 => pos += 12 * vlen,
                _ if kind <= KIND_TYPE_TAG => {}
                _ => return Err(BtfError::UnknownKind(kind)),
            }
            types.push(Type {
                name_off,
                kind,
                size_or_type,
                members,
            });
        }
        Ok(Self { types, strings })
    }

    fn name(&self, off: u32) -> &str {
        let rest = self.strings.get(off as usize..).unwrap_or_default();
        let end = rest.iter().position(|&b| b == 0).unwrap_or(rest.len());
        std::str::from_utf8(&rest[..end]).unwrap_or_default()
    }

    fn get(&self, id: u32) -> Result<&Type> {
        self.types.get(id as usize).ok_or(BtfError::TypeId(id))
    }

    /// Follows typedefs and qualifiers.
    fn resolve(&self, mut id: u32) -> Result<&Type> {
        loop {
            let t = self.get(id)?;
            match t.kind {
                KIND_TYPEDEF | KIND_VOLATILE | KIND_CONST | KIND_RESTRICT | KIND_TYPE_TAG => {
                    id = t.size_or_type;
                }
                _ => return Ok(t),
            }
        }
    }

    /// Byte offset of `member` in `struct name`, looking through anonymous
    /// struct/union members as C does.
    pub fn member_offset(&self, name: &str, member: &str, expect: Expect) -> Result<u32> {
        let st = self
            .types
            .iter()
            .find(|t| t.kind == KIND_STRUCT && self.name(t.name_off) == name)
            .ok_or_else(|| BtfError::NoStruct(name.to_owned()))?;
        let (bits, type_id) = self
            .find_member(st, member)?
            .ok_or_else(|| BtfError::NoMember(name.to_owned(), member.to_owned()))?;
        if bits % 8 != 0 {
            return Err(BtfError::Bitfield(name.to_owned(), member.to_owned()));
        }
        let t = self.resolve(type_id)?;
        let ok = match expect {
            Expect::Pointer => t.kind == KIND_PTR,
            Expect::Int(bytes) => t.kind == KIND_INT && t.size_or_type == bytes,
            Expect::Struct => t.kind == KIND_STRUCT,
        };
        if !ok {
            return Err(BtfError::Kind {
                name: name.to_owned(),
                member: member.to_owned(),
                expect,
                kind: t.kind,
            });
        }
        Ok(bits / 8)
    }

    fn find_member(&self, st: &Type, member: &str) -> Result<Option<(u32, u32)>> {
        for m in &st.members {
            let m_name = self.name(m.name_off);
            if m_name == member {
                return Ok(Some((m.offset, m.type_id)));
            }
            if m_name.is_empty() {
                let inner = self.resolve(m.type_id)?;
                if matches!(inner.kind, KIND_STRUCT | KIND_UNION) {
                    if let Some((off, ty)) = self.find_member(inner, member)? {
                        return Ok(Some((m.offset + off, ty)));
                    }
                }
            }
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Builds BTF for `struct inode { u64 i_ino @64 }` and
    /// `struct file { union { struct inode *f_inode; } @32 }`.
    fn sample() -> Vec<u8> {
        let strings = b"\0u64\0inode\0i_ino\0file\0f_inode\0";
        let (u64_s, inode_s, i_ino_s, file_s, f_inode_s) = (1u32, 5, 11, 17, 22);
        let info = |kind: u32, vlen: u32| (kind << 24) | vlen;
        #[rustfmt::skip]
        let words: Vec<u32> = vec![
            // 1: INT u64, 8 bytes, 64 bits.
            u64_s, info(KIND_INT, 0), 8, 64,
            // 2: struct inode, 72 bytes, i_ino at bit 512.
            inode_s, info(KIND_STRUCT, 1), 72, i_ino_s, 1, 512,
            // 3: struct inode *
            0, info(KIND_PTR, 0), 2,
            // 4: anonymous union { f_inode }.
            0, info(KIND_UNION, 1), 8, f_inode_s, 3, 0,
            // 5: struct file, the union at bit 256.
            file_s, info(KIND_STRUCT, 1), 40, 0, 4, 256,
        ];
        let types: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
        let mut out = Vec::new();
        out.extend_from_slice(&BTF_MAGIC.to_le_bytes());
        out.extend_from_slice(&[1, 0]); // version, flags
        for w in [
            24u32,
            0,
            types.len() as u32,
            types.len() as u32,
            strings.len() as u32,
        ] {
            out.extend_from_slice(&w.to_le_bytes());
        }
        out.extend_from_slice(&types);
        out.extend_from_slice(strings);
        out
    }

    #[test]
    fn finds_offsets_through_anonymous_unions() {
        let btf = Btf::parse(&sample()).unwrap();
        assert_eq!(
            btf.member_offset("file", "f_inode", Expect::Pointer)
                .unwrap(),
            32
        );
        assert_eq!(
            btf.member_offset("inode", "i_ino", Expect::Int(8)).unwrap(),
            64
        );
    }

    #[test]
    fn rejects_wrong_shapes() {
        let btf = Btf::parse(&sample()).unwrap();
        assert!(btf
            .member_offset("inode", "i_ino", Expect::Pointer)
            .is_err());
        assert!(btf.member_offset("file", "f_mode", Expect::Int(4)).is_err());
        assert!(btf
            .member_offset("dentry", "d_inode", Expect::Pointer)
            .is_err());
    }
}
