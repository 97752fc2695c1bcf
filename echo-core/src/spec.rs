//! The sample spec: the ordered leaves of a sample pytree.
//!
//! A spec lists leaves in wire order (optree's flatten order: dict keys sorted
//! at every level). Each leaf has a name, a shape and a numpy dtype; the item
//! size is derived from the dtype, and the payload size of one sample is the
//! sum over leaves of `prod(shape) * itemsize`, computed with overflow checks.

use std::fmt;
use std::str::FromStr;

use serde::Serialize;
use serde_json::Value;

/// Why a spec was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecError {
    /// The spec has no leaves.
    #[error("spec is empty: expected at least one leaf")]
    Empty,
    /// The payload of one sample would be zero bytes.
    #[error("spec describes a zero-byte payload (leaf `{leaf}` has a zero dimension); expected every leaf to hold at least one element")]
    ZeroBytes {
        /// The first leaf with no elements.
        leaf: String,
    },
    /// A dtype name that is not one of the supported numpy dtypes.
    #[error("leaf `{leaf}`: unknown dtype {got:?}; expected one of {}", DType::NAMES.join(", "))]
    UnknownDtype {
        /// The leaf naming it.
        leaf: String,
        /// What was given.
        got: String,
    },
    /// A dimension that does not fit the wire's u32.
    #[error(
        "leaf `{leaf}`: dimension {got} does not fit in u32 (max {})",
        u32::MAX
    )]
    DimTooLarge {
        /// The leaf.
        leaf: String,
        /// The dimension given.
        got: String,
    },
    /// The leaf or payload size overflows.
    #[error("leaf `{leaf}`: size overflows (shape {shape:?} x itemsize {itemsize})")]
    Overflow {
        /// The leaf.
        leaf: String,
        /// Its shape.
        shape: Vec<u32>,
        /// Its item size.
        itemsize: usize,
    },
    /// Two leaves share a name.
    #[error("leaf name `{0}` appears twice; expected unique names")]
    DuplicateName(String),
    /// The JSON text is not a spec.
    #[error("spec JSON: {0}")]
    Json(String),
}

/// A numpy dtype supported by echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize)]
#[serde(into = "&'static str")]
#[allow(missing_docs)]
pub enum DType {
    Bool,
    Int8,
    Int16,
    Int32,
    Int64,
    Uint8,
    Uint16,
    Uint32,
    Uint64,
    Float16,
    Float32,
    Float64,
    Complex64,
    Complex128,
}

impl DType {
    /// Every dtype, in a stable order.
    pub const ALL: [DType; 14] = [
        DType::Bool,
        DType::Int8,
        DType::Int16,
        DType::Int32,
        DType::Int64,
        DType::Uint8,
        DType::Uint16,
        DType::Uint32,
        DType::Uint64,
        DType::Float16,
        DType::Float32,
        DType::Float64,
        DType::Complex64,
        DType::Complex128,
    ];

    /// The numpy names of [`DType::ALL`], in the same order.
    pub const NAMES: [&'static str; 14] = [
        "bool",
        "int8",
        "int16",
        "int32",
        "int64",
        "uint8",
        "uint16",
        "uint32",
        "uint64",
        "float16",
        "float32",
        "float64",
        "complex64",
        "complex128",
    ];

    /// Bytes per element (numpy's `itemsize`).
    pub const fn itemsize(self) -> usize {
        match self {
            DType::Bool | DType::Int8 | DType::Uint8 => 1,
            DType::Int16 | DType::Uint16 | DType::Float16 => 2,
            DType::Int32 | DType::Uint32 | DType::Float32 => 4,
            DType::Int64 | DType::Uint64 | DType::Float64 | DType::Complex64 => 8,
            DType::Complex128 => 16,
        }
    }

    /// The numpy name, e.g. `"float32"`.
    pub fn name(self) -> &'static str {
        let i = DType::ALL.iter().position(|d| *d == self).unwrap_or(0);
        DType::NAMES[i]
    }

    /// The numpy array-protocol type string, little-endian (e.g. `"<f4"`, `"|b1"`).
    pub fn numpy_descr(self) -> &'static str {
        match self {
            DType::Bool => "|b1",
            DType::Int8 => "|i1",
            DType::Int16 => "<i2",
            DType::Int32 => "<i4",
            DType::Int64 => "<i8",
            DType::Uint8 => "|u1",
            DType::Uint16 => "<u2",
            DType::Uint32 => "<u4",
            DType::Uint64 => "<u8",
            DType::Float16 => "<f2",
            DType::Float32 => "<f4",
            DType::Float64 => "<f8",
            DType::Complex64 => "<c8",
            DType::Complex128 => "<c16",
        }
    }
}

impl From<DType> for &'static str {
    fn from(d: DType) -> Self {
        d.name()
    }
}

impl fmt::Display for DType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DType {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DType::NAMES
            .iter()
            .position(|n| *n == s)
            .map(|i| DType::ALL[i])
            .ok_or_else(|| s.to_string())
    }
}

/// One leaf of a sample: a named, fixed-shape numpy array.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Leaf {
    /// The leaf's path in the pytree, keys joined with `.` (e.g. `obs.image`).
    pub name: String,
    /// The array's shape; `[]` is a 0-d (scalar) leaf.
    pub shape: Vec<u32>,
    /// The array's dtype.
    pub dtype: DType,
}

impl Leaf {
    /// A new leaf.
    pub fn new(name: impl Into<String>, shape: impl Into<Vec<u32>>, dtype: DType) -> Self {
        Leaf {
            name: name.into(),
            shape: shape.into(),
            dtype,
        }
    }

    /// Number of elements (product of the shape), or `None` on overflow.
    pub fn num_elements(&self) -> Option<usize> {
        self.shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d as usize))
    }

    /// Bytes this leaf takes in one payload, or `None` on overflow.
    pub fn nbytes(&self) -> Option<usize> {
        self.num_elements()?.checked_mul(self.dtype.itemsize())
    }
}

/// The ordered leaves of a sample, with derived sizes. Always valid once built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Spec {
    leaves: Vec<Leaf>,
    leaf_bytes: Vec<usize>,
    leaf_offsets: Vec<usize>,
    payload_size: usize,
}

impl Spec {
    /// Builds a spec from leaves in wire order, checking every size.
    pub fn new(leaves: Vec<Leaf>) -> Result<Spec, SpecError> {
        if leaves.is_empty() {
            return Err(SpecError::Empty);
        }
        let mut leaf_bytes = Vec::with_capacity(leaves.len());
        let mut leaf_offsets = Vec::with_capacity(leaves.len());
        let mut total: usize = 0;
        let mut names = std::collections::HashSet::new();
        for leaf in &leaves {
            if !names.insert(leaf.name.as_str()) {
                return Err(SpecError::DuplicateName(leaf.name.clone()));
            }
            let overflow = || SpecError::Overflow {
                leaf: leaf.name.clone(),
                shape: leaf.shape.clone(),
                itemsize: leaf.dtype.itemsize(),
            };
            let n = leaf.nbytes().ok_or_else(overflow)?;
            if n == 0 {
                return Err(SpecError::ZeroBytes {
                    leaf: leaf.name.clone(),
                });
            }
            leaf_offsets.push(total);
            leaf_bytes.push(n);
            total = total.checked_add(n).ok_or_else(overflow)?;
        }
        // Keep payloads addressable with a u64 everywhere and well below isize::MAX.
        if total > isize::MAX as usize / 4 {
            let last = &leaves[leaves.len() - 1];
            return Err(SpecError::Overflow {
                leaf: last.name.clone(),
                shape: last.shape.clone(),
                itemsize: last.dtype.itemsize(),
            });
        }
        Ok(Spec {
            leaves,
            leaf_bytes,
            leaf_offsets,
            payload_size: total,
        })
    }

    /// A spec with one `uint8` leaf named `data` of `n` bytes (handy for raw byte payloads).
    pub fn bytes(n: u32) -> Result<Spec, SpecError> {
        Spec::new(vec![Leaf::new("data", vec![n], DType::Uint8)])
    }

    /// The leaves, in wire order.
    pub fn leaves(&self) -> &[Leaf] {
        &self.leaves
    }

    /// Bytes of one sample on the wire.
    pub fn payload_size(&self) -> usize {
        self.payload_size
    }

    /// Bytes of leaf `i` in one payload.
    pub fn leaf_bytes(&self, i: usize) -> usize {
        self.leaf_bytes[i]
    }

    /// Offset of leaf `i` inside a payload.
    pub fn leaf_offset(&self, i: usize) -> usize {
        self.leaf_offsets[i]
    }

    /// The part of the spec the wire v1 handshake carries.
    pub fn wire(&self) -> WireSpec {
        WireSpec {
            leaves: self
                .leaves
                .iter()
                .map(|l| WireLeaf {
                    itemsize: l.dtype.itemsize() as u32,
                    shape: l.shape.clone(),
                })
                .collect(),
        }
    }

    /// Parses a spec from JSON text. Two forms are accepted:
    ///
    /// * a list of leaves in wire order: `[{"name": "obs", "shape": [4], "dtype": "float32"}, ...]`;
    /// * a nested object whose leaves are `{"shape": [...], "dtype": "..."}`, flattened with
    ///   keys sorted at every level (optree's order), names joined with `.`:
    ///   `{"obs": {"shape": [4], "dtype": "float32"}, "reward": {"shape": [], "dtype": "float32"}}`.
    pub fn from_json(text: &str) -> Result<Spec, SpecError> {
        let value: Value =
            serde_json::from_str(text).map_err(|e| SpecError::Json(e.to_string()))?;
        Spec::from_json_value(&value)
    }

    /// Like [`Spec::from_json`], from a parsed value.
    pub fn from_json_value(value: &Value) -> Result<Spec, SpecError> {
        let mut leaves = Vec::new();
        match value {
            Value::Array(items) => {
                for (i, item) in items.iter().enumerate() {
                    let obj = item.as_object().ok_or_else(|| {
                        SpecError::Json(format!(
                            "leaf #{i}: expected an object {{\"name\", \"shape\", \"dtype\"}}, got {}",
                            kind(item)
                        ))
                    })?;
                    let name = match obj.get("name") {
                        Some(Value::String(s)) => s.clone(),
                        Some(other) => {
                            return Err(SpecError::Json(format!(
                                "leaf #{i}: expected \"name\" to be a string, got {}",
                                kind(other)
                            )))
                        }
                        None => format!("{i}"),
                    };
                    leaves.push(parse_leaf(&name, item)?);
                }
            }
            Value::Object(_) => flatten(value, &mut String::new(), &mut leaves, 0)?,
            other => {
                return Err(SpecError::Json(format!(
                    "expected a list of leaves or an object of leaves, got {}",
                    kind(other)
                )))
            }
        }
        Spec::new(leaves)
    }

    /// The spec as JSON (the list form), which [`Spec::from_json`] reads back.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(&self.leaves).unwrap_or(Value::Null)
    }
}

impl fmt::Display for Spec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[")?;
        for (i, l) in self.leaves.iter().enumerate() {
            if i > 0 {
                f.write_str(", ")?;
            }
            write!(f, "{}: {}{:?}", l.name, l.dtype, l.shape)?;
        }
        write!(f, "] ({} bytes)", self.payload_size)
    }
}

const MAX_JSON_DEPTH: usize = 64;

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

fn is_leaf(v: &Value) -> bool {
    matches!(v, Value::Object(m) if m.get("dtype").is_some_and(Value::is_string) && m.get("shape").is_some_and(Value::is_array))
}

fn flatten(
    v: &Value,
    prefix: &mut String,
    out: &mut Vec<Leaf>,
    depth: usize,
) -> Result<(), SpecError> {
    if depth > MAX_JSON_DEPTH {
        return Err(SpecError::Json(format!(
            "at `{prefix}`: nested deeper than {MAX_JSON_DEPTH} levels"
        )));
    }
    if is_leaf(v) {
        out.push(parse_leaf(prefix, v)?);
        return Ok(());
    }
    let Value::Object(map) = v else {
        return Err(SpecError::Json(format!(
            "at `{prefix}`: expected a leaf {{\"shape\": [...], \"dtype\": \"...\"}} or an object of leaves, got {}",
            kind(v)
        )));
    };
    if map.is_empty() && depth > 0 {
        return Err(SpecError::Json(format!(
            "at `{prefix}`: empty object has no leaves"
        )));
    }
    let mut keys: Vec<&String> = map.keys().collect();
    keys.sort();
    for k in keys {
        let len = prefix.len();
        if !prefix.is_empty() {
            prefix.push('.');
        }
        prefix.push_str(k);
        flatten(&map[k.as_str()], prefix, out, depth + 1)?;
        prefix.truncate(len);
    }
    Ok(())
}

fn parse_leaf(name: &str, v: &Value) -> Result<Leaf, SpecError> {
    let err = |msg: String| SpecError::Json(format!("leaf `{name}`: {msg}"));
    let obj = v
        .as_object()
        .ok_or_else(|| err(format!("expected an object, got {}", kind(v))))?;
    let dtype = match obj.get("dtype") {
        Some(Value::String(s)) => s.parse::<DType>().map_err(|got| SpecError::UnknownDtype {
            leaf: name.to_string(),
            got,
        })?,
        Some(other) => {
            return Err(err(format!(
                "expected \"dtype\" to be a string, got {}",
                kind(other)
            )))
        }
        None => return Err(err("missing \"dtype\"".into())),
    };
    let shape = match obj.get("shape") {
        Some(Value::Array(dims)) => dims
            .iter()
            .map(|d| match d {
                Value::Number(n) => match n.as_u64() {
                    Some(x) => u32::try_from(x).map_err(|_| SpecError::DimTooLarge {
                        leaf: name.to_string(),
                        got: x.to_string(),
                    }),
                    None => Err(if n.as_f64().is_some_and(|f| f > u32::MAX as f64) {
                        SpecError::DimTooLarge {
                            leaf: name.to_string(),
                            got: n.to_string(),
                        }
                    } else {
                        err(format!(
                            "expected a dimension to be a non-negative integer, got {n}"
                        ))
                    }),
                },
                other => Err(err(format!(
                    "expected a dimension to be a non-negative integer, got {}",
                    kind(other)
                ))),
            })
            .collect::<Result<Vec<u32>, SpecError>>()?,
        Some(other) => {
            return Err(err(format!(
                "expected \"shape\" to be a list, got {}",
                kind(other)
            )))
        }
        None => return Err(err("missing \"shape\"".into())),
    };
    Ok(Leaf {
        name: name.to_string(),
        shape,
        dtype,
    })
}

/// One leaf as the wire v1 handshake describes it: item size and shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireLeaf {
    /// Bytes per element.
    pub itemsize: u32,
    /// Dimensions.
    pub shape: Vec<u32>,
}

/// The spec as the wire v1 handshake carries it (no names or dtypes).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct WireSpec {
    /// Leaves in wire order.
    pub leaves: Vec<WireLeaf>,
}

impl WireSpec {
    /// Payload size, or `None` on overflow.
    pub fn payload_size(&self) -> Option<usize> {
        self.leaves.iter().try_fold(0usize, |acc, l| {
            let n = l
                .shape
                .iter()
                .try_fold(l.itemsize as usize, |a, &d| a.checked_mul(d as usize))?;
            acc.checked_add(n)
        })
    }

    /// The shapes, as the Python client prints them.
    pub fn shapes(&self) -> Vec<Vec<u32>> {
        self.leaves.iter().map(|l| l.shape.clone()).collect()
    }

    /// The item sizes, as the Python client prints them.
    pub fn itemsizes(&self) -> Vec<u32> {
        self.leaves.iter().map(|l| l.itemsize).collect()
    }

    /// Checks that the server's spec (`self`) is the one a client expects, with the
    /// Python client's wording on mismatch.
    pub fn check_matches(&self, expected: &WireSpec) -> Result<(), crate::Error> {
        if self == expected {
            return Ok(());
        }
        Err(crate::Error::SpecMismatch(format!(
            "shapes={:?} vs expected={:?}, dtype_sizes={:?} vs expected={:?}",
            self.shapes(),
            expected.shapes(),
            self.itemsizes(),
            expected.itemsizes()
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn itemsizes_match_numpy() {
        let want = [1, 1, 2, 4, 8, 1, 2, 4, 8, 2, 4, 8, 8, 16];
        for (d, w) in DType::ALL.iter().zip(want) {
            assert_eq!(d.itemsize(), w, "{d}");
            assert_eq!(d.name().parse::<DType>().unwrap(), *d);
        }
    }

    #[test]
    fn nested_object_is_flattened_sorted() {
        let s = Spec::from_json(
            r#"{"reward": {"shape": [], "dtype": "float32"},
                "obs": {"image": {"shape": [2, 3], "dtype": "uint8"}, "agent": {"shape": [4], "dtype": "float16"}},
                "done": {"shape": [1], "dtype": "bool"}}"#,
        )
        .unwrap();
        let names: Vec<_> = s.leaves().iter().map(|l| l.name.as_str()).collect();
        assert_eq!(names, ["done", "obs.agent", "obs.image", "reward"]);
        assert_eq!(s.payload_size(), 1 + 8 + 6 + 4);
        assert_eq!(s.leaf_offset(2), 9);
        assert_eq!(s.leaves()[3].shape, Vec::<u32>::new());
    }

    #[test]
    fn list_form_keeps_order_and_round_trips() {
        let s = Spec::from_json(
            r#"[{"name": "z", "shape": [2], "dtype": "int64"}, {"name": "a", "shape": [3, 1], "dtype": "complex128"}]"#,
        )
        .unwrap();
        assert_eq!(s.leaves()[0].name, "z");
        assert_eq!(s.payload_size(), 16 + 48);
        let again = Spec::from_json(&s.to_json().to_string()).unwrap();
        assert_eq!(again, s);
    }

    #[test]
    fn rejections_name_the_leaf() {
        assert_eq!(Spec::from_json("[]").unwrap_err(), SpecError::Empty);
        assert_eq!(Spec::from_json("{}").unwrap_err(), SpecError::Empty);
        let e = Spec::from_json(r#"{"x": {"shape": [0, 3], "dtype": "float32"}}"#).unwrap_err();
        assert_eq!(e, SpecError::ZeroBytes { leaf: "x".into() });
        let e = Spec::from_json(r#"{"x": {"shape": [3], "dtype": "float8"}}"#).unwrap_err();
        assert!(
            matches!(&e, SpecError::UnknownDtype { leaf, got } if leaf == "x" && got == "float8")
        );
        assert!(e.to_string().contains("float32"), "{e}");
        let e = Spec::from_json(r#"{"a": {"b": {"shape": [4294967296], "dtype": "uint8"}}}"#)
            .unwrap_err();
        assert!(
            matches!(&e, SpecError::DimTooLarge { leaf, .. } if leaf == "a.b"),
            "{e}"
        );
        let e = Spec::from_json(
            r#"{"big": {"shape": [4294967295, 4294967295, 4294967295], "dtype": "float64"}}"#,
        )
        .unwrap_err();
        assert!(
            matches!(&e, SpecError::Overflow { leaf, .. } if leaf == "big"),
            "{e}"
        );
        let e = Spec::from_json(
            r#"{"a": {"shape": [4294967295, 4294967295], "dtype": "float64"}, "b": {"shape": [4294967295, 4294967295], "dtype": "float64"}}"#,
        )
        .unwrap_err();
        assert!(matches!(&e, SpecError::Overflow { .. }), "{e}");
        let e = Spec::from_json(r#"{"x": {"shape": [-1], "dtype": "uint8"}}"#).unwrap_err();
        assert!(e.to_string().contains("leaf `x`"), "{e}");
        let e = Spec::from_json(r#"{"x": 3}"#).unwrap_err();
        assert!(e.to_string().contains("`x`"), "{e}");
        let e = Spec::from_json("not json").unwrap_err();
        assert!(matches!(e, SpecError::Json(_)));
    }

    #[test]
    fn wire_mismatch_reads_like_python() {
        let a = Spec::bytes(4).unwrap().wire();
        let b = Spec::bytes(5).unwrap().wire();
        let e = a.check_matches(&b).unwrap_err().to_string();
        assert_eq!(
            e,
            "Server spec mismatch: shapes=[[4]] vs expected=[[5]], dtype_sizes=[1] vs expected=[1]"
        );
    }
}
