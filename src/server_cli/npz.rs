//! Writing a batch as a `.npz` file: a zip archive (stored, not compressed) of
//! one `.npy` file per leaf, named by the leaf's name, shaped
//! `(batch, *leaf_shape)`, with the leaf's dtype.

use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};

use echo::{Batch, LeafView};

/// CRC-32 (IEEE 802.3, as zip uses), slicing by 8.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Crc32(u32);

const fn crc_tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 {
                0xEDB8_8320 ^ (c >> 1)
            } else {
                c >> 1
            };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut i = 0;
    while i < 256 {
        let mut j = 1;
        while j < 8 {
            t[j][i] = (t[j - 1][i] >> 8) ^ t[0][(t[j - 1][i] & 0xff) as usize];
            j += 1;
        }
        i += 1;
    }
    t
}

static CRC: [[u32; 256]; 8] = crc_tables();

impl Crc32 {
    pub(crate) fn new() -> Self {
        Crc32(!0)
    }

    pub(crate) fn update(&mut self, data: &[u8]) {
        let t = &CRC;
        let mut c = self.0;
        let mut chunks = data.chunks_exact(8);
        for b in &mut chunks {
            let lo = u32::from_le_bytes([b[0], b[1], b[2], b[3]]) ^ c;
            let hi = u32::from_le_bytes([b[4], b[5], b[6], b[7]]);
            c = t[7][(lo & 0xff) as usize]
                ^ t[6][((lo >> 8) & 0xff) as usize]
                ^ t[5][((lo >> 16) & 0xff) as usize]
                ^ t[4][(lo >> 24) as usize]
                ^ t[3][(hi & 0xff) as usize]
                ^ t[2][((hi >> 8) & 0xff) as usize]
                ^ t[1][((hi >> 16) & 0xff) as usize]
                ^ t[0][(hi >> 24) as usize];
        }
        for &b in chunks.remainder() {
            c = t[0][((c ^ u32::from(b)) & 0xff) as usize] ^ (c >> 8);
        }
        self.0 = c;
    }

    pub(crate) fn finish(self) -> u32 {
        !self.0
    }
}

/// The `.npy` header (format 1.0, or 2.0 if the header would not fit 1.0's u16
/// length) for an array of this dtype and shape; the data that follows starts at
/// a multiple of 64 bytes.
pub(crate) fn npy_header(descr: &str, shape: &[usize]) -> Vec<u8> {
    let dims = match shape {
        [] => "()".to_string(),
        [n] => format!("({n},)"),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let dict = format!("{{'descr': '{descr}', 'fortran_order': False, 'shape': {dims}, }}");
    let build = |major: u8, len_bytes: usize| {
        let fixed = 6 + 2 + len_bytes;
        let unpadded = fixed + dict.len() + 1;
        let total = unpadded.div_ceil(64) * 64;
        let header_len = total - fixed;
        let mut h = Vec::with_capacity(total);
        h.extend_from_slice(b"\x93NUMPY");
        h.extend_from_slice(&[major, 0]);
        if len_bytes == 2 {
            h.extend_from_slice(&(header_len as u16).to_le_bytes());
        } else {
            h.extend_from_slice(&(header_len as u32).to_le_bytes());
        }
        h.extend_from_slice(dict.as_bytes());
        h.resize(total - 1, b' ');
        h.push(b'\n');
        (h, header_len)
    };
    let (h, len) = build(1, 2);
    if len <= u16::MAX as usize {
        h
    } else {
        build(2, 4).0
    }
}

/// The file name of batch number `index`: `batch-000007.npz`, or
/// `batch-000007-partial.npz` for the short final batch.
pub(crate) fn batch_file_name(index: u64, partial: bool) -> String {
    if partial {
        format!("batch-{index:06}-partial.npz")
    } else {
        format!("batch-{index:06}.npz")
    }
}

struct Member {
    name: Vec<u8>,
    crc: u32,
    size: u32,
    offset: u32,
}

fn too_large(what: &str) -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidInput,
        format!(
            "{what} exceeds 4 GiB, which needs zip64 (not supported); use a smaller --batch-size"
        ),
    )
}

/// Writes `batch` to `dir` as batch number `index` (written to a hidden temporary
/// file, then renamed, so readers never see half a file). Returns the path and the
/// bytes written.
pub(crate) fn write_batch(dir: &Path, index: u64, batch: &Batch) -> io::Result<(PathBuf, u64)> {
    let name = batch_file_name(index, batch.is_partial());
    let path = dir.join(&name);
    let tmp = dir.join(format!(".{name}.tmp"));
    let result = (|| {
        let file = File::create(&tmp)?;
        let mut w = BufWriter::with_capacity(1 << 20, file);
        let n = write_npz(&mut w, batch.leaves())?;
        w.into_inner().map_err(|e| e.into_error())?;
        Ok(n)
    })();
    match result {
        Ok(n) => {
            std::fs::rename(&tmp, &path)?;
            Ok((path, n))
        }
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

/// Writes the leaves as an `.npz` archive; returns the bytes written.
pub(crate) fn write_npz<'a, W: Write>(
    w: &mut W,
    leaves: impl Iterator<Item = LeafView<'a>>,
) -> io::Result<u64> {
    // DOS date 1980-01-01 00:00: the archive has no meaningful timestamps.
    const DOS_TIME: u16 = 0;
    const DOS_DATE: u16 = (1 << 5) | 1;
    const VERSION: u16 = 20;
    let mut members = Vec::new();
    let mut offset: u64 = 0;
    for leaf in leaves {
        let name = format!("{}.npy", leaf.name()).into_bytes();
        let name_len = u16::try_from(name.len()).map_err(|_| {
            io::Error::new(io::ErrorKind::InvalidInput, "leaf name longer than 65 KiB")
        })?;
        let header = npy_header(leaf.dtype().numpy_descr(), &leaf.shape());
        let data = leaf.bytes();
        let size = u32::try_from(header.len() as u64 + data.len() as u64)
            .map_err(|_| too_large(&format!("leaf `{}` in one batch", leaf.name())))?;
        let local_offset = u32::try_from(offset).map_err(|_| too_large("the batch file"))?;
        let mut crc = Crc32::new();
        crc.update(&header);
        crc.update(data);
        let crc = crc.finish();
        let flags: u16 = if name.is_ascii() { 0 } else { 1 << 11 };
        let mut lh = Vec::with_capacity(30 + name.len());
        lh.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
        lh.extend_from_slice(&VERSION.to_le_bytes());
        lh.extend_from_slice(&flags.to_le_bytes());
        lh.extend_from_slice(&0u16.to_le_bytes()); // stored
        lh.extend_from_slice(&DOS_TIME.to_le_bytes());
        lh.extend_from_slice(&DOS_DATE.to_le_bytes());
        lh.extend_from_slice(&crc.to_le_bytes());
        lh.extend_from_slice(&size.to_le_bytes());
        lh.extend_from_slice(&size.to_le_bytes());
        lh.extend_from_slice(&name_len.to_le_bytes());
        lh.extend_from_slice(&0u16.to_le_bytes());
        lh.extend_from_slice(&name);
        w.write_all(&lh)?;
        w.write_all(&header)?;
        w.write_all(data)?;
        offset += lh.len() as u64 + u64::from(size);
        members.push(Member {
            name,
            crc,
            size,
            offset: local_offset,
        });
    }
    let count = u16::try_from(members.len()).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "more than 65535 leaves need zip64 (not supported)",
        )
    })?;
    let cd_offset = u32::try_from(offset).map_err(|_| too_large("the batch file"))?;
    let mut cd = Vec::new();
    for m in &members {
        let flags: u16 = if m.name.is_ascii() { 0 } else { 1 << 11 };
        cd.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
        cd.extend_from_slice(&(0x0300 | VERSION).to_le_bytes()); // made by: Unix
        cd.extend_from_slice(&VERSION.to_le_bytes());
        cd.extend_from_slice(&flags.to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes());
        cd.extend_from_slice(&DOS_TIME.to_le_bytes());
        cd.extend_from_slice(&DOS_DATE.to_le_bytes());
        cd.extend_from_slice(&m.crc.to_le_bytes());
        cd.extend_from_slice(&m.size.to_le_bytes());
        cd.extend_from_slice(&m.size.to_le_bytes());
        cd.extend_from_slice(&(m.name.len() as u16).to_le_bytes());
        cd.extend_from_slice(&0u16.to_le_bytes()); // extra
        cd.extend_from_slice(&0u16.to_le_bytes()); // comment
        cd.extend_from_slice(&0u16.to_le_bytes()); // disk
        cd.extend_from_slice(&0u16.to_le_bytes()); // internal attributes
        cd.extend_from_slice(&(0o100644u32 << 16).to_le_bytes()); // a regular file, rw-r--r--
        cd.extend_from_slice(&m.offset.to_le_bytes());
        cd.extend_from_slice(&m.name);
    }
    let cd_size = u32::try_from(cd.len()).map_err(|_| too_large("the zip directory"))?;
    cd.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
    cd.extend_from_slice(&0u16.to_le_bytes());
    cd.extend_from_slice(&0u16.to_le_bytes());
    cd.extend_from_slice(&count.to_le_bytes());
    cd.extend_from_slice(&count.to_le_bytes());
    cd.extend_from_slice(&cd_size.to_le_bytes());
    cd.extend_from_slice(&cd_offset.to_le_bytes());
    cd.extend_from_slice(&0u16.to_le_bytes());
    w.write_all(&cd)?;
    w.flush()?;
    Ok(offset + cd.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use echo::{Server, Spec};

    #[test]
    fn crc32_known_values() {
        let mut c = Crc32::new();
        c.update(b"123456789");
        assert_eq!(c.finish(), 0xCBF4_3926);
        // Incremental over odd splits equals one pass.
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let mut one = Crc32::new();
        one.update(&data);
        let mut parts = Crc32::new();
        for chunk in data.chunks(13) {
            parts.update(chunk);
        }
        assert_eq!(one.finish(), parts.finish());
        assert_eq!(Crc32::new().finish(), 0);
    }

    #[test]
    fn npy_headers_are_aligned_and_read_like_numpy() {
        for shape in [&[][..], &[5][..], &[2, 3, 4][..]] {
            let h = npy_header("<f4", shape);
            assert_eq!(h.len() % 64, 0);
            assert_eq!(&h[..8], b"\x93NUMPY\x01\x00");
            assert_eq!(u16::from_le_bytes([h[8], h[9]]) as usize, h.len() - 10);
            assert_eq!(*h.last().unwrap(), b'\n');
        }
        let h = npy_header("|b1", &[4]);
        let text = std::str::from_utf8(&h[10..]).unwrap();
        assert!(text.starts_with("{'descr': '|b1', 'fortran_order': False, 'shape': (4,), }"));
        let h = npy_header("<c16", &[2, 3]);
        assert!(std::str::from_utf8(&h[10..])
            .unwrap()
            .contains("'shape': (2, 3), "));
        let long: Vec<usize> = vec![7; 30_000];
        let h = npy_header("<i8", &long);
        assert_eq!(&h[6..8], &[2, 0]);
        assert_eq!(h.len() % 64, 0);
    }

    const SPEC: &str = r#"{
        "obs": {"image": {"shape": [2, 3], "dtype": "uint8"}, "vec": {"shape": [3], "dtype": "float16"}},
        "done": {"shape": [], "dtype": "bool"},
        "reward": {"shape": [], "dtype": "float32"},
        "z": {"shape": [2], "dtype": "complex128"},
        "ünï": {"shape": [1], "dtype": "int64"}
    }"#;

    /// numpy.load's view of an npz file: per array, name, dtype.str, shape, bytes hex.
    fn numpy_view(path: &Path) -> serde_json::Value {
        let code = r#"
import json, sys, numpy as np
with np.load(sys.argv[1]) as z:
    print(json.dumps([{"name": k, "descr": z[k].dtype.str, "shape": list(z[k].shape),
                       "hex": z[k].tobytes().hex()} for k in z.files]))
"#;
        let out = std::process::Command::new(echo_core::testkit::python_interpreter())
            .args(["-c", code])
            .arg(path)
            .output()
            .expect("run python");
        assert!(
            out.status.success(),
            "numpy.load failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn hex(b: &[u8]) -> String {
        b.iter().map(|x| format!("{x:02x}")).collect()
    }

    #[tokio::test]
    async fn numpy_loads_full_and_partial_batches_byte_exact() {
        let spec = Spec::from_json(SPEC).unwrap();
        let server = Server::builder(spec.clone()).batch_size(4).build().unwrap();
        let size = spec.payload_size();
        let data: Vec<u8> = (0..6 * size).map(|i| (i * 31 % 251) as u8).collect();
        server.submit(&data).await.unwrap();
        let dir = tempfile::tempdir().unwrap();

        let full = server.next_batch().await.unwrap();
        let (path, n) = write_batch(dir.path(), 0, &full).unwrap();
        assert_eq!(path.file_name().unwrap(), "batch-000000.npz");
        assert_eq!(std::fs::metadata(&path).unwrap().len(), n);
        let view = numpy_view(&path);
        let arrays = view.as_array().unwrap();
        assert_eq!(arrays.len(), spec.leaves().len());
        for (a, leaf) in arrays.iter().zip(full.leaves()) {
            assert_eq!(a["name"], leaf.name());
            assert_eq!(a["descr"], leaf.dtype().numpy_descr());
            let shape: Vec<usize> = serde_json::from_value(a["shape"].clone()).unwrap();
            assert_eq!(shape, leaf.shape());
            assert_eq!(a["hex"], hex(leaf.bytes()));
        }
        // Sample 1's leaves, reassembled from numpy's arrays, are its payload.
        let mut sample = Vec::new();
        for (i, a) in arrays.iter().enumerate() {
            let lb = spec.leaf_bytes(i);
            let h = a["hex"].as_str().unwrap();
            sample.push(h[2 * lb..4 * lb].to_string());
        }
        assert_eq!(sample.concat(), hex(&data[size..2 * size]));
        drop(full);

        server.shutdown().await.unwrap();
        let partial = server.next_batch().await.unwrap();
        assert!(partial.is_partial());
        let (path, _) = write_batch(dir.path(), 1, &partial).unwrap();
        assert_eq!(path.file_name().unwrap(), "batch-000001-partial.npz");
        let view = numpy_view(&path);
        assert_eq!(view[0]["shape"], serde_json::json!([2]));
        assert_eq!(view[1]["shape"], serde_json::json!([2, 2, 3]));
        assert_eq!(view[1]["name"], "obs.image");
        assert_eq!(view[5]["name"], "ünï");
        // No temporary files are left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");
    }
}
