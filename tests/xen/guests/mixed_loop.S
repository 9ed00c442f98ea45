/* Guest "bs2": a boot sector looping over devices Xen emulates itself and devices it forwards.
 * Each iteration, exactly:
 *     OUT 0x70, IN 0x71          RTC index/data (CMOS seconds)       - emulated by Xen
 *     OUT 0x43, IN 0x40, IN 0x40 PIT latch counter 0, read lo/hi       - emulated by Xen
 *     OUT 0xcf8 (dword), IN 0xcfc (dword)  PCI config of 00:00.0 reg 0 - forwarded (PCI config)
 *     MOV word to 0xb8000+di     VGA text memory (stdvga)             - forwarded, buffered
 *     REP OUTSB x4 to 0x3ff      COM1 scratch register, string I/O      - forwarded: one
 *                                request of 4 bytes from guest memory (data_is_ptr)
 *     IN  0x3fd, OUT 0x3f8       COM1: one byte, '+' ('\n' every 64th) - forwarded
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
    mov  $0xb800, %ax
    mov  %ax, %es
    xor  %cx, %cx
    xor  %di, %di
next:
    mov  $0x00, %al
    outb %al, $0x70             /* OUT 0x70 */
    inb  $0x71, %al             /* IN 0x71 */
    mov  $0x00, %al
    outb %al, $0x43             /* OUT 0x43: latch counter 0 */
    inb  $0x40, %al             /* IN 0x40 (low) */
    inb  $0x40, %al             /* IN 0x40 (high) */
    mov  $0xcf8, %dx
    mov  $0x80000000, %eax
    outl %eax, %dx              /* OUT 0xcf8 */
    mov  $0xcfc, %dx
    inl  %dx, %eax              /* IN 0xcfc */
    movw $0x072b, %es:(%di)     /* VGA text: '+' grey on black */
    add  $2, %di
    and  $0x0fff, %di
    push %cx
    mov  $0x3ff, %dx
    mov  $0x7c00, %si           /* 4 bytes of this sector (DS = 0) */
    mov  $4, %cx
    cld
    rep outsb                   /* REP OUTSB x4 to 0x3ff */
    pop  %cx
    mov  $0x3fd, %dx
    inb  %dx, %al               /* IN 0x3fd */
    mov  %al, %bl
    inc  %cx
    mov  $'+', %al
    test $63, %cx
    jnz  1f
    mov  $'\n', %al
1:  mov  $0x3f8, %dx
    outb %al, %dx               /* OUT 0x3f8 */
    call poll                   /* a command from Dom0? */
    jmp  next

    .include "hold.inc"

    .org 510
    .word 0xaa55
