use super::*;

const FORMAT: &str = "name: page_fault_user
ID: 190
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:unsigned long address;\toffset:8;\tsize:8;\tsigned:0;
\tfield:unsigned long ip;\toffset:16;\tsize:8;\tsigned:0;
\tfield:unsigned long error_code;\toffset:24;\tsize:8;\tsigned:0;

print fmt: \"address=%ps ip=%ps error_code=0x%lx\"
";

#[test]
fn field_layout_reads_the_format_file() {
    assert_eq!(field_layout(FORMAT, "error_code"), Some((24, 8)));
    assert_eq!(field_layout(FORMAT, "address"), Some((8, 8)));
    assert_eq!(field_layout(FORMAT, "common_pid"), Some((4, 4)));
    assert_eq!(field_layout(FORMAT, "code"), None);
    assert_eq!(field_layout(FORMAT, "missing"), None);
}

#[test]
fn instance_names_are_plain_directory_names() {
    for good in ["vm0", "primary-1", "a.b_c"] {
        assert!(check_name(good).is_ok(), "{good}");
    }
    for bad in ["", ".", "..", "a/b", "../x", "a b", &"x".repeat(65)] {
        assert!(
            matches!(check_name(bad), Err(EbpfError::InvalidName { .. })),
            "{bad}"
        );
    }
}

#[test]
fn the_embedded_object_is_a_bpf_elf() {
    // ELF magic, 64-bit, little-endian, e_machine EM_BPF (247).
    assert_eq!(&EBPF_OBJECT[..4], b"\x7fELF");
    assert_eq!(EBPF_OBJECT[4], 2);
    assert_eq!(EBPF_OBJECT[5], 1);
    assert_eq!(u16::from_le_bytes([EBPF_OBJECT[18], EBPF_OBJECT[19]]), 247);
}
