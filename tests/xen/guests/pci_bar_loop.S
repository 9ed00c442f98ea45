/* Guest "bs5": a boot sector scanning PCI configuration space through 0xcf8/0xcfc and touching
 * a memory BAR of the stdvga device (1234:1111), the BAR hvmloader assigned above 1 MiB.
 *
 * Once, at start: for device 0..31 of bus 0 (function 0) read the vendor/device dword; print
 *     "P<mask> B<bar2>\n"   mask: bit N set when device N answered (not 0xffffffff),
 *                           bar2: the stdvga's BAR 2 (its MMIO registers), both 8 hex digits
 * then enter unreal mode (FS: base 0, 4 GiB limit) to reach the BAR from real mode.
 * Each loop iteration, exactly:
 *     32 x (OUT 0xcf8 dword, IN 0xcfc dword)  vendor/device of 00:00.0 .. 00:1f.0
 *     MOVW to BAR2+0x500, MOVW from BAR2+0x500  the Bochs VBE ID register (size 2): MMIO
 *                                               forwarded to the device model
 *     IN  0x3fd, OUT 0x3f8        COM1: one byte, '*' ('\n' every 64th)
 * so its serial output counts its iterations. A command from Dom0 on COM1 ('S' stop, 'G' go:
 * hold.inc) is read after a whole iteration. */
    .code16
    .globl _start
_start:
    cli
    xor  %ax, %ax
    mov  %ax, %ds
    mov  %ax, %ss
    mov  $0x7c00, %sp
    call serial_setup
    xor  %ebp, %ebp             /* devices that answered */
    xor  %edi, %edi             /* the stdvga's BAR 2 */
    xor  %ebx, %ebx
scan:
    mov  %ebx, %eax
    call cfg_read               /* reg 0: vendor/device */
    cmp  $0xffffffff, %eax
    je   2f
    bts  %ebx, %ebp
    cmp  $0x11111234, %eax      /* device 0x1111, vendor 0x1234: stdvga */
    jne  2f
    mov  %ebx, %eax
    or   $((0x18 >> 2) << 5), %al   /* reg 0x18: BAR 2 */
    call cfg_read
    and  $0xfffffff0, %eax
    mov  %eax, %edi
2:  inc  %ebx
    cmp  $32, %ebx
    jb   scan

    mov  $'P', %al
    call putc
    mov  %ebp, %eax
    call hex32
    mov  $' ', %al
    call putc
    mov  $'B', %al
    call putc
    mov  %edi, %eax
    call hex32
    mov  $'\n', %al
    call putc

    /* unreal mode: load FS with a flat 4 GiB data segment in protected mode, come back */
    lgdt gdtr
    mov  %cr0, %eax
    or   $1, %al
    mov  %eax, %cr0
    mov  $8, %bx
    mov  %bx, %fs
    and  $0xfe, %al
    mov  %eax, %cr0

    lea  0x500(%edi), %esi      /* BAR2 + 0x500: VBE_DISPI_INDEX_ID */
    xor  %cx, %cx
next:
    xor  %ebx, %ebx
3:  mov  %ebx, %eax
    call cfg_read               /* OUT 0xcf8, IN 0xcfc */
    inc  %ebx
    cmp  $32, %ebx
    jb   3b
    movw $0xb0c5, %fs:(%esi)    /* MMIO write: the VBE ID it already holds */
    movw %fs:(%esi), %ax        /* MMIO read */
    mov  $0x3fd, %dx
    inb  %dx, %al               /* IN 0x3fd */
    mov  %al, %bl
    inc  %cx
    mov  $'*', %al
    test $63, %cx
    jnz  1f
    mov  $'\n', %al
1:  call putc                   /* OUT 0x3f8 */
    call poll                   /* a command from Dom0? */
    jmp  next

/* The config dword of bus 0, function 0: eax holds the device number in bits 0-4 and the
 * register's dword index above them; returns the dword in eax (edx clobbered). */
cfg_read:
    push %dx
    mov  %eax, %edx
    and  $0x1f, %eax            /* device */
    shl  $11, %eax
    shr  $5, %edx               /* dword register index */
    shl  $2, %edx
    or   %edx, %eax
    or   $0x80000000, %eax
    mov  $0xcf8, %dx
    outl %eax, %dx
    mov  $0xcfc, %dx
    inl  %dx, %eax
    pop  %dx
    ret

/* eax: printed as 8 upper-case hex digits */
hex32:
    mov  $8, %cx
1:  rol  $4, %eax
    push %eax
    and  $0x0f, %al
    add  $'0', %al
    cmp  $'9', %al
    jbe  2f
    add  $7, %al
2:  call putc
    pop  %eax
    loop 1b
    ret

putc:
    mov  $0x3f8, %dx
    outb %al, %dx
    ret

    .include "hold.inc"

gdt:
    .quad 0
    .word 0xffff, 0x0000        /* limit 15:0, base 15:0 */
    .byte 0x00, 0x92, 0xcf, 0x00 /* base 23:16, data RW, 4 KiB granules + 32-bit, base 31:24 */
gdtr:
    .word gdtr - gdt - 1
    .long gdt

    .org 510
    .word 0xaa55
